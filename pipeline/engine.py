"""The encoder engine: picks the device and dtype, warms the model up, encodes uint8 frames.

Everything that decides how fast a batch runs lives here: device, compute dtype (autocast),
inference mode, memory format, host-to-device copies and CPU thread counts, and the runtime: torch,
or on a CPU an ONNX Runtime graph of the same model (pipeline/onnx_runtime.py), verified against torch
at start-up. The batcher calls `encode` from its single encoder thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from model.checkpoint import LoadedEncoder
from model.normalize import Normalize
from pipeline.onnx_runtime import OnnxEncoder, load_verified, resolve_runtime

log = logging.getLogger("rice.engine")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; anything else as torch spells it ('cpu', 'cuda:1')."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> fp16 on CUDA (tensor cores), fp32 on CPU (bf16 only pays off on CPUs with
    AVX512-BF16/AMX, so it is opt-in there)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected auto, fp32, fp16 or bf16")
    return DTYPES[name]


class EncoderEngine:
    """Runs the backbone in inference mode under autocast, or its verified ONNX export (runtime
    'onnx' or 'auto' on a CPU; see `pipeline.onnx_runtime`). Call `encode` from one thread at a time."""

    def __init__(
        self,
        loaded: LoadedEncoder,
        device: str = "auto",
        torch_threads: int = 0,
        dtype: str = "auto",
        cuda_graphs: bool = True,
        runtime: str = "torch",
        onnx_precision: str = "fp32",
        onnx_dir: str = "data/onnx",
    ) -> None:
        # torch_threads: process-wide for torch, so the assembly (service.state.set_process_threads) sets it
        self.torch_threads = torch_threads
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.model = loaded.backbone.to(self.device).eval()
        if self.device.type == "cuda":
            # _forward's permute yields NHWC-strided tensors; channels_last convs read them without a copy
            # and are the fast path for fp16 tensor-core kernels.
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs lack it
        self.config = loaded.config
        self.model_version = loaded.model_version
        self.source = loaded.source
        crop = self.config.preprocess.crop
        self.frame_shape = (crop, crop, 3)
        self.warmed = False
        self._pinned: torch.Tensor | None = None
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}  # size -> graph, in, out
        self._normalize = Normalize(self.config.preprocess).to(self.device)
        self._onnx: OnnxEncoder | None = None
        self.dim = self._probe_dim()
        if runtime == "auto" and self.autocast:
            runtime = "torch"  # RICE_DTYPE asked for torch's reduced precision: auto does not override it
        if resolve_runtime(runtime, self.device) == "onnx":
            # The torch model stays: it is the reference of the verification, and the last fallback.
            # A refused INT8 graph falls back to the fp32 one (still ~2x torch eager), then to torch.
            for precision in dict.fromkeys((onnx_precision, "fp32")):
                self._onnx = load_verified(
                    self.model,
                    self.config.preprocess,
                    self.frame_shape,
                    self.model_version,
                    self._encode_torch,
                    onnx_dir,
                    precision,
                    threads=torch_threads or torch.get_num_threads(),  # RICE_TORCH_THREADS, else torch's (the physical cores)
                )
                if self._onnx is not None:
                    break
                log.warning(
                    "the ONNX %s encoder does not serve; %s",
                    precision,
                    "trying fp32" if precision != "fp32" else "the encoder runs on torch",
                )

    @property
    def runtime(self) -> str:
        """What encodes: 'torch', 'onnx-fp32' or 'onnx-int8'."""
        return "torch" if self._onnx is None else f"onnx-{self._onnx.precision}"

    @property
    def autocast(self) -> bool:
        return self.dtype != torch.float32

    def _probe_dim(self) -> int:
        return int(self.encode(np.zeros((1, *self.frame_shape), dtype=np.uint8)).shape[1])

    def warm_up(self, batch_size: int, rounds: int = 2) -> float:
        """Run full-size batches (and a single frame) so the first requests don't pay for lazy
        init, kernel selection or allocator growth; with CUDA graphs on, capture one graph per
        batch size of the ladder 1, 2, 4, ..., batch_size. Returns the seconds it took."""
        t = time.perf_counter()
        for _ in range(rounds):
            self.encode(np.zeros((batch_size, *self.frame_shape), dtype=np.uint8))
        self.encode(np.zeros((1, *self.frame_shape), dtype=np.uint8))
        if self.cuda_graphs:
            self._capture(batch_size)
        self.warmed = True
        return time.perf_counter() - t

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] on the device -> float32 [B, D], L2-normalised. Allocates nothing
        on the host, so it can be captured as a CUDA graph."""
        x = self._normalize(x)  # [B, 3, H, W], NHWC-strided; constants already on the device
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast, cache_enabled=False):
            emb, _ = self.model(x)
        return F.normalize(emb.float(), dim=-1)

    def _capture(self, max_batch: int) -> None:
        """One CUDA graph per ladder size: a small network like Lite0 is bound by kernel launches
        (and the GIL they need); replaying a graph launches the whole forward at once."""
        sizes = sorted({min(2**i, max_batch) for i in range(max_batch.bit_length() + 1)}, reverse=True)
        pool = torch.cuda.graph_pool_handle()  # graphs never run at once: they share one memory pool
        with torch.inference_mode():
            for n in sizes:
                static_in = torch.zeros((n, *self.frame_shape), dtype=torch.uint8, device=self.device)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._forward(static_in)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    static_out = self._forward(static_in)
                self._graphs[n] = (graph, static_in, static_out)
        log.info("captured CUDA graphs for batch sizes %s", sorted(self._graphs))

    def _host_batch(self, parts: Sequence[np.ndarray]) -> torch.Tensor:
        """Gather the parts into one uint8 [B, H, W, 3] host tensor. Torch copies release the GIL,
        so this runs on the encoder thread without stalling the event loop; on CUDA it lands in a
        reused pinned buffer (pinning a fresh one per batch costs more than the copy)."""
        n = sum(len(p) for p in parts)
        if self.device.type != "cuda":
            return torch.from_numpy(parts[0]) if len(parts) == 1 else torch.cat([torch.from_numpy(p) for p in parts])
        if self._pinned is None or self._pinned.shape[0] < n:
            self._pinned = torch.empty((max(n, 64), *parts[0].shape[1:]), dtype=torch.uint8).pin_memory()
        row = 0
        for p in parts:
            self._pinned[row : row + len(p)].copy_(torch.from_numpy(p))
            row += len(p)
        return self._pinned[:n]

    def encode(self, frames: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """uint8 [B, H, W, 3] RGB (one array, or parts to stack) -> float32 [B, D], L2-normalised."""
        if self._onnx is not None:
            batch = frames if isinstance(frames, np.ndarray) else frames[0] if len(frames) == 1 else np.concatenate(frames)
            return self._onnx.encode(batch)
        return self._encode_torch(frames)

    def _encode_torch(self, frames: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        parts = [frames] if isinstance(frames, np.ndarray) else list(frames)
        with torch.inference_mode():
            x = self._host_batch(parts)
            n = x.shape[0]
            size = min((s for s in self._graphs if s >= n), default=None)
            if size is not None:
                graph, static_in, static_out = self._graphs[size]
                # Rows past n keep stale frames: each row is independent, and their outputs are dropped.
                static_in[:n].copy_(x, non_blocking=True)
                graph.replay()
                return static_out[:n].cpu().numpy()
            if self.device.type == "cuda":
                # uint8 travels (4x less than float); the pinned source makes the copy asynchronous.
                # The buffer is reused only after .cpu() below has synchronised this batch.
                x = x.to(self.device, non_blocking=True)
            return self._forward(x).cpu().numpy()
