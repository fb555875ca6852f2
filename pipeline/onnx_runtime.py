"""The encoder as an ONNX Runtime graph: export, INT8 quantisation, on-disk cache, verification.

On a CPU, torch eager runs EfficientNet-Lite0's depthwise convolutions far below what the cores can
do; ONNX Runtime's fused kernels run the same graph about 2.5x faster (fp32) and its VNNI INT8
kernels faster again (docs/PERFORMANCE.md, "Encoder runtimes"). The exported graph takes what the
torch engine takes, uint8 [B, H, W, 3] RGB frames from the numpy/OpenCV preprocessing, and returns
L2-normalised float32 [B, D]: normalisation and the final L2 norm are part of the graph.

An export is made once per model version and precision and cached as
<dir>/<model_version>/<precision>.onnx (written atomically, so replicas sharing the directory never
read half a file). Every load, cached or fresh, is checked against torch on a fixed batch before it
serves; a graph that fails to load or to match is replaced once, and if the fresh one fails too, the
caller falls back (INT8 to the fp32 graph, fp32 to torch).

INT8 keeps its precision only where the CPU sums int8 products exactly: VNNI on x86 (AVX-512 VNNI,
AVX-VNNI, AMX) or the dot-product extension on Arm. On an AVX2-only CPU ONNX Runtime's u8 x s8
kernels add pairs of products in saturating 16-bit lanes: measured on an AVX2-only AMD EPYC, the
least cosine to torch was 0.967 (0.995 on an AVX-512 VNNI Xeon), so the verification refuses INT8
there and the fp32 graph serves.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.config import PreprocessConfig
from model.normalize import Normalize

log = logging.getLogger("rice.onnx")

RUNTIMES = ("torch", "onnx", "auto")
PRECISIONS = ("fp32", "int8")
# The least cosine between a runtime's embedding and torch's, per frame of the fixed batch, for it to serve.
MIN_COSINE = {"fp32": 0.999, "int8": 0.99}
VERIFY_FRAMES = 8
CALIBRATION_FRAMES = 16

Encode = Callable[[np.ndarray], np.ndarray]  # uint8 [B, H, W, 3] -> float32 [B, D]


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def int8_dot_product(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has the integer dot-product instructions INT8 needs to match torch (see the
    module docstring); read from /proc/cpuinfo's flags, False where that cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return bool(set(cpuinfo.split()) & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})


def resolve_runtime(name: str, device: torch.device) -> str:
    """'torch' or 'onnx' for the requested runtime on this device. auto: onnx on a CPU (when
    onnxruntime is installed), torch on CUDA, where torch with fp16 and CUDA graphs is the fast path.
    An explicit 'onnx' on CUDA is refused (logged): this backend runs on the CPU only."""
    if name not in RUNTIMES:
        raise ValueError(f"unknown encoder runtime {name!r}; expected one of {', '.join(RUNTIMES)}")
    if name == "torch":
        return "torch"
    if device.type != "cpu":
        if name == "onnx":
            log.warning("RICE_ENCODER_RUNTIME=onnx runs on the CPU only; device %s keeps the torch runtime", device)
        return "torch"
    if not onnxruntime_available():
        log.warning("onnxruntime is not installed; the encoder runs on torch")
        return "torch"
    return "onnx"


class _Graph(nn.Module):
    """What is exported: uint8 frames [B, H, W, 3] -> L2-normalised embeddings [B, D]."""

    def __init__(self, backbone: nn.Module, pre: PreprocessConfig) -> None:
        super().__init__()
        self.backbone, self.normalize = backbone, Normalize(pre)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        emb, _ = self.backbone(self.normalize(frames))
        return F.normalize(emb.float(), dim=-1)


def export_fp32(backbone: nn.Module, pre: PreprocessConfig, frame_shape: tuple[int, int, int], path: Path) -> None:
    """Trace the backbone (with normalisation) into an ONNX file; the batch axis stays dynamic.
    The TorchScript exporter is used: it needs no extra package, and the frame size is fixed anyway
    (the 'same' padding it traces as constants is that of this size)."""
    graph = _Graph(backbone, pre).eval()
    example = torch.zeros((2, *frame_shape), dtype=torch.uint8)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about the constant padding, deprecation notices
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=["frames"],
            output_names=["embeddings"],
            dynamic_axes={"frames": {0: "batch"}, "embeddings": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def quantize_int8(fp32_path: Path, path: Path, calibration: np.ndarray) -> None:
    """Static INT8 quantisation calibrated on `calibration` (uint8 [N, H, W, 3]): per-channel int8
    weights, uint8 activations, in the QOperator format, whose fused integer kernels (VNNI) are the
    fast ones on a CPU; QDQ graphs measured 3x slower than fp32 here. The first two convolutions (for
    Lite0 the stem and the first depthwise one) stay fp32: quantising them took the least cosine to
    torch from 0.995 to 0.95 (their per-tensor activation range is wide), at little speed."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] = iter(np.array_split(calibration, max(1, len(calibration) // 8)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"frames": batch}

    pre_path = path.with_suffix(".pre.onnx")
    root = logging.getLogger()
    quiet = _QuantizerNoise()
    root.addFilter(quiet)  # the quantiser logs a warning per shape tensor it leaves alone, on the root logger
    try:
        quant_pre_process(str(fp32_path), str(pre_path), skip_symbolic_shape=True)
        convs = [n.name for n in onnx.load(str(pre_path), load_external_data=False).graph.node if n.op_type == "Conv"]
        quantize_static(
            str(pre_path),
            str(path),
            Reader(),
            quant_format=QuantFormat.QOperator,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=convs[:2],
        )
    finally:
        root.removeFilter(quiet)
        pre_path.unlink(missing_ok=True)
        Path(str(path) + ".data").unlink(missing_ok=True)  # an external-data side file, if one was made


class _QuantizerNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname


def synthetic_frames(n: int, frame_shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """uint8 [n, H, W, 3]: product-photo-like frames (a lit background, boxes and labels with text,
    blur, sensor noise), deterministic per seed. The default calibration set and the fixed batch of
    verification, so neither needs a catalog; `rice export-onnx --images` calibrates on real photos."""
    rng = np.random.default_rng(seed)
    h, w, _ = frame_shape
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        ramp = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        img = np.ascontiguousarray(np.broadcast_to(a * (1 - ramp) + b * ramp, (h, w, 3)).astype(np.uint8))
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = int(rng.integers(0, w * 2 // 3)), int(rng.integers(0, h * 2 // 3))
            x1, y1 = int(rng.integers(x0 + w // 6, w + 1)), int(rng.integers(y0 + h // 6, h + 1))
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            cv2.rectangle(img, (x0, y0), (x1, y1), color, -1)
            label = tuple(int(c) for c in rng.integers(0, 256, 3))
            cv2.ellipse(img, ((x0 + x1) // 2, (y0 + y1) // 2), ((x1 - x0) // 3, (y1 - y0) // 4), 0, 0, 360, label, -1)
            text = "".join(chr(int(c)) for c in rng.integers(65, 91, 5))
            ink = tuple(255 - c for c in label)
            cv2.putText(img, text, (x0 + 4, (y0 + y1) // 2), cv2.FONT_HERSHEY_SIMPLEX, max(0.3, (x1 - x0) / 160), ink, 2)
        blurred = cv2.GaussianBlur(img, (3, 3), 0).astype(np.float32)
        out[i] = np.clip(blurred + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    return out


class OnnxEncoder:
    """An ONNX Runtime session over an exported encoder graph. Call `encode` from one thread at a time."""

    def __init__(self, path: Path, threads: int, precision: str) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # RICE_TORCH_THREADS semantics: the intra-op pool of one batch
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle pool threads would otherwise spin between batches on cores the decode workers need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.path, self.precision = path, precision

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> float32 [B, D], L2-normalised."""
        out = self.session.run(None, {"frames": np.ascontiguousarray(frames, dtype=np.uint8)})[0]
        return np.asarray(out, dtype=np.float32)


def cache_path(root: str | os.PathLike[str], model_version: str, precision: str) -> Path:
    """Where the export of this model version and precision is cached."""
    return Path(root) / model_version / f"{precision}.onnx"


def verify(candidate: Encode, reference: Encode, frames: np.ndarray, precision: str) -> float:
    """The least per-frame cosine between the candidate's and torch's embeddings of `frames`
    (-1.0 when the shapes differ or a value is not finite)."""
    got, want = candidate(frames), reference(frames)
    if got.shape != want.shape or not np.isfinite(got).all():
        return -1.0
    return float((got * want).sum(axis=1).min())


class ExportFailed(RuntimeError):
    pass


# Exports this process made with the default calibration, by (model version, precision): a second
# cache directory in the same process (a test session's many apps) copies the file instead of
# tracing again. The copy is verified like any cached file.
_made: dict[tuple[str, str], Path] = {}


def build(
    backbone: nn.Module,
    pre: PreprocessConfig,
    frame_shape: tuple[int, int, int],
    path: Path,
    precision: str,
    calibration: np.ndarray | None = None,
    model_version: str = "",
) -> None:
    """Export (and for int8, quantise) into `path`, atomically: a temp file in the same directory,
    renamed over the target, so a concurrent reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{precision}-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    fp32_tmp = tmp.with_suffix(".fp32.onnx")
    earlier = _made.get((model_version, precision)) if model_version and calibration is None else None
    try:
        if earlier is not None and earlier != path and earlier.exists():
            shutil.copyfile(earlier, tmp)
        elif precision == "fp32":
            export_fp32(backbone, pre, frame_shape, tmp)
        else:
            export_fp32(backbone, pre, frame_shape, fp32_tmp)
            frames = synthetic_frames(CALIBRATION_FRAMES, frame_shape, seed=0) if calibration is None else calibration
            quantize_int8(fp32_tmp, tmp, frames)
        tmp.replace(path)
        if model_version and calibration is None:
            _made[(model_version, precision)] = path
    finally:
        tmp.unlink(missing_ok=True)
        fp32_tmp.unlink(missing_ok=True)


def load_verified(
    backbone: nn.Module,
    pre: PreprocessConfig,
    frame_shape: tuple[int, int, int],
    model_version: str,
    reference: Encode,
    root: str | os.PathLike[str],
    precision: str = "fp32",
    threads: int = 1,
    calibration: np.ndarray | None = None,
    rebuild: bool = False,
) -> OnnxEncoder | None:
    """The cached export of this model version and precision, exported first if missing (or if
    `rebuild`), checked against `reference` (torch) on a fixed batch. A cached file that does not
    load or match is exported again once; None (logged) when the fresh export fails too, so the
    caller keeps torch."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown ONNX precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    path = cache_path(root, model_version, precision)
    fixed = synthetic_frames(VERIFY_FRAMES, frame_shape, seed=1)
    for attempt in ("cached", "fresh"):
        exists = path.exists() and not (rebuild and attempt == "cached")
        if attempt == "cached" and not exists:
            continue
        if not exists or attempt == "fresh":
            try:
                build(backbone, pre, frame_shape, path, precision, calibration, model_version)
                log.info("exported the %s encoder of model %s to %s", precision, model_version, path)
            except Exception as e:  # the exporter and quantiser raise many kinds; any means "no graph"
                why = f"{type(e).__name__}: {e}"
                log.error("ONNX %s export of model %s failed (%s)", precision, model_version, why)
                return None
        try:
            encoder = OnnxEncoder(path, threads, precision)
            cosine = verify(encoder.encode, reference, fixed, precision)
        except Exception as e:  # a truncated or foreign file fails in onnxruntime's loader with its own errors
            log.warning("ONNX %s encoder at %s does not load (%s: %s)", precision, path, type(e).__name__, e)
            cosine = None
        if cosine is not None and cosine >= MIN_COSINE[precision]:
            log.info("ONNX %s encoder verified against torch: least cosine %.5f on %d frames", precision, cosine, len(fixed))
            return encoder
        if cosine is not None:
            log.warning(
                "ONNX %s encoder at %s refused: least cosine %.5f to torch, below %.3f", precision, path, cosine, MIN_COSINE[precision]
            )
        _made.pop((model_version, precision), None)  # a bad file is never copied again
        if attempt == "cached":
            log.warning("re-exporting the %s encoder of model %s", precision, model_version)
    path.unlink(missing_ok=True)  # the next start tries afresh rather than verifying a known-bad file
    hint = ""
    if precision == "int8" and not int8_dot_product():
        hint = " (this CPU has no VNNI / dot-product instructions, where INT8 loses precision: use fp32)"
    log.error("the ONNX %s encoder of model %s does not match torch%s", precision, model_version, hint)
    return None
