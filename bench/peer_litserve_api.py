"""The LitServe side of bench/peer_litserve.py, in its own process: the same encoder behind LitServe's
dynamic batching. Started by that script (arguments: kind, port, max batch, wait ms, threads, runtime,
precision, ONNX cache dir); a module of its own because only this process needs litserve (the `bench` extra).
"""

from __future__ import annotations

import sys
from typing import Any

import litserve as ls
import numpy as np
import torch
from starlette.requests import Request

from bench.peer_litserve import CLIP_FRAMES, Runtime
from pipeline.decode import DecodeLimits, decode_clip, decode_image
from pipeline.stages import clip_vector


class EncoderAPI(ls.LitAPI):
    """The encoder behind LitServe: decode in decode_request, encode a batch of requests' frames at once."""

    def __init__(self, kind: str, threads: int, max_batch_size: int, batch_timeout: float, runtime: Runtime) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.kind, self.threads, self.runtime = kind, threads, runtime

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads)
        self.engine = self.runtime.engine(self.threads)
        if self.engine.runtime != self.runtime.expected:  # the ONNX graph failed verification: not the same runtime
            raise RuntimeError(f"LitServe's encoder runs {self.engine.runtime}, not {self.runtime.expected}")
        self.engine.warm_up(self.max_batch_size * (CLIP_FRAMES if self.kind == "clip" else 1))
        self.pre = self.engine.config.preprocess

    def decode_request(self, request: Any) -> np.ndarray:
        data = request["file"].file.read()  # LitServe parsed the multipart form
        if self.kind == "clip":
            return decode_clip(data, CLIP_FRAMES, self.pre, DecodeLimits()).frames
        return decode_image(data, self.pre, 3840 * 2160)[None]

    def batch(self, inputs: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
        return np.concatenate(inputs), [len(x) for x in inputs]

    def predict(self, x: tuple[np.ndarray, list[int]]) -> list[list[float]]:
        frames, counts = x
        emb = self.engine.encode(frames)
        out, start = [], 0
        for n in counts:
            out.append(clip_vector(emb[start : start + n]).tolist())
            start += n
        return out

    def unbatch(self, output: list[list[float]]) -> list[list[float]]:
        return output

    def encode_response(self, output: list[float]) -> dict[str, Any]:
        return {"embedding": output}


# LitServe parses a multipart form only when decode_request's `request` is annotated with
# starlette's Request class; this module's annotations are strings (PEP 563), so set it here.
EncoderAPI.decode_request.__annotations__["request"] = Request


def litserve_main(port: int, kind: str, max_batch_size: int, wait_ms: float, threads: int, runtime: Runtime) -> None:
    """Serve the encoder through LitServe until stopped (bench/peer_litserve.py stops the process group)."""
    api = EncoderAPI(kind, threads, max_batch_size, wait_ms / 1000, runtime)
    # fast_queue: LitServe's ZeroMQ queues between its API server and worker, its fastest transport
    # (the default goes through multiprocessing manager queues)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=120, fast_queue=True)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    kind, port, batch, wait_ms, threads, runtime, precision, onnx_dir = sys.argv[1:]
    litserve_main(int(port), kind, int(batch), float(wait_ms), int(threads), Runtime(runtime, precision, onnx_dir))
