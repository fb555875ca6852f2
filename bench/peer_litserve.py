"""The peer, side by side: LitServe (with its dynamic batching) serving the same encoder vs this service.

Both servers run in their own processes on this machine with the same encoder (the built-in
ImageNet EfficientNet-Lite0 through `pipeline.engine.EncoderEngine`, the same torch threads), the
same decoding and preprocessing (`pipeline.decode`), and frame batches of the same size:

- this service: `rice serve`, RICE_MAX_BATCH_SIZE frames per batch, RICE_MAX_WAIT_MS, an empty
  gallery (it still runs its search stage; LitServe's answer is only the embedding);
- LitServe: a `LitAPI` whose decode_request decodes the upload, whose batch/predict encodes the
  frames of up to max_batch_size requests in one `EncoderEngine.encode` call (max_batch_size =
  the frame budget / frames per request, batch_timeout = the same wait), one worker.

Workloads: image requests (one still each) and clip requests (10 frames sampled from a 20-frame
clip), closed-loop clients, multipart uploads to both. Rounds alternate which server goes first;
the ratio ours/LitServe is reported per round and as the median.

    PYTHONPATH=. .venv/bin/python bench/peer_litserve.py [--image-clients 32] [--clip-clients 8] [--seconds 15] [--rounds 3]

Needs the `bench` extra (`pip install -e .[bench]`: litserve).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import litserve as ls
import numpy as np
import torch
from starlette.requests import Request

from model.checkpoint import default_encoder
from pipeline.decode import DecodeLimits, decode_clip, decode_image
from pipeline.engine import EncoderEngine
from pipeline.stages import clip_vector
from service.server import free_port
from tools.clipsynth import encode_video
from tools.democatalog import make_products, render_clip
from tools.service_process import serve

ROOT = Path(__file__).resolve().parents[1]
CLIP_FRAMES = 10


class EncoderAPI(ls.LitAPI):
    """The encoder behind LitServe: decode in decode_request, encode a batch of requests' frames at once."""

    def __init__(self, kind: str, threads: int, max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.kind, self.threads = kind, threads

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads)
        self.engine = EncoderEngine(default_encoder(), "cpu", self.threads)
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


def litserve_main(port: int, kind: str, max_batch_size: int, wait_ms: float, threads: int) -> None:
    """The LitServe side (run in its own process by this script with --serve-litserve)."""
    api = EncoderAPI(kind, threads, max_batch_size, wait_ms / 1000)
    # fast_queue: LitServe's ZeroMQ queues between its API server and worker, its fastest transport
    # (the default goes through multiprocessing manager queues)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=120, fast_queue=True)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)


@contextmanager
def litserve(kind: str, max_batch_size: int, wait_ms: float, threads: int) -> Iterator[str]:
    port = free_port()
    args = [sys.executable, __file__, "--serve-litserve", kind, str(port), str(max_batch_size), str(wait_ms), str(threads)]
    # its own process group: LitServe starts worker processes, and all of them must stop with it
    proc = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("LitServe did not become ready")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


async def closed_loop(url: str, path: str, payloads: list[bytes], clients: int, seconds: float, params: dict[str, int]) -> dict[str, float]:
    lat: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client(i: int, c: httpx.AsyncClient) -> None:
        j = i
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            r = await c.post(path, params=params, files={"file": ("upload", payloads[j % len(payloads)])})
            r.raise_for_status()
            lat.append(time.perf_counter() - t)
            j += clients

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=clients)) as c:
        await asyncio.gather(*(client(i, c) for i in range(clients)))
    wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1e3
    return {"per_s": len(lat) / wall, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-clients", type=int, default=32)
    p.add_argument("--clip-clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-frames", type=int, default=32, help="frames per encoder batch, both servers")
    p.add_argument("--wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=2, help="torch threads, both servers")
    p.add_argument("--serve-litserve", nargs=5, metavar=("KIND", "PORT", "BATCH", "WAIT_MS", "THREADS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_litserve:
        kind, port, batch, wait_ms, threads = args.serve_litserve
        litserve_main(int(port), kind, int(batch), float(wait_ms), int(threads))
        return

    import cv2

    products = make_products(8, seed=4)
    rng = np.random.default_rng(0)
    images = [cv2.imencode(".jpg", pr.image)[1].tobytes() for pr in products]
    clips = [encode_video(render_clip(pr, rng, num_frames=20, scale=(0.8, 0.95))) for pr in products]
    env = {
        "RICE_GALLERY_PATH": ":memory:",
        "RICE_MAX_BATCH_SIZE": str(args.batch_frames),
        "RICE_MAX_WAIT_MS": str(args.wait_ms),
        "RICE_TORCH_THREADS": str(args.threads),
    }
    workloads = [
        ("image", images, args.image_clients, "/v1/recognize/image", {}, 1),
        ("clip", clips, args.clip_clients, "/v1/recognize", {"num_frames": CLIP_FRAMES}, CLIP_FRAMES),
    ]
    summary = []
    with serve(env) as (ours, _):
        for kind, payloads, clients, path, params, frames in workloads:
            ls_batch = max(1, args.batch_frames // frames)
            with litserve(kind, ls_batch, args.wait_ms, args.threads) as peer:
                targets = {"ours": (ours, path, params), "litserve": (peer, "/predict", {})}
                for url, route, q in targets.values():  # warm-up, both
                    asyncio.run(closed_loop(url, route, payloads, clients, 3, q))
                ratios = []
                for rnd in range(args.rounds):
                    order = ["ours", "litserve"] if rnd % 2 == 0 else ["litserve", "ours"]
                    got = {}
                    for name in order:
                        url, route, q = targets[name]
                        got[name] = asyncio.run(closed_loop(url, route, payloads, clients, args.seconds, q))
                    ratio = got["ours"]["per_s"] / got["litserve"]["per_s"]
                    ratios.append(ratio)
                    print(
                        f"{kind} round {rnd + 1}: ours {got['ours']['per_s']:.2f}/s (p50 {got['ours']['p50_ms']:.0f} ms, "
                        f"p99 {got['ours']['p99_ms']:.0f} ms), LitServe {got['litserve']['per_s']:.2f}/s "
                        f"(p50 {got['litserve']['p50_ms']:.0f} ms, p99 {got['litserve']['p99_ms']:.0f} ms): {ratio:.2f}",
                        flush=True,
                    )
                summary.append((kind, clients, ls_batch, ratios))
    print("| requests | clients | LitServe max_batch_size | ours / LitServe per round | median |")
    print("|---|---|---|---|---|")
    for kind, clients, ls_batch, ratios in summary:
        print(f"| {kind} | {clients} | {ls_batch} | {', '.join(f'{r:.2f}' for r in ratios)} | **{statistics.median(ratios):.2f}** |")


if __name__ == "__main__":
    main()
