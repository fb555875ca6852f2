"""The peer, side by side: LitServe (with its dynamic batching) serving the same encoder vs this service.

Both servers run in their own processes on this machine with the same encoder (the built-in
ImageNet EfficientNet-Lite0 through `pipeline.engine.EncoderEngine`, the same threads), the same
runtime (`--runtime torch|onnx`, `--precision fp32|int8` for ONNX Runtime; both load the same
cached export from `--onnx-dir`, and each side's runtime is checked before measuring, since a
failed ONNX verification falls back to torch), the same decoding and preprocessing
(`pipeline.decode`), and frame batches of the same size:

- this service: `rice serve`, RICE_MAX_BATCH_SIZE frames per batch, RICE_MAX_WAIT_MS, an empty
  gallery (it still runs its search stage, and on clips its default region stage: 2 crops of 3
  frames through the encoder besides the 10 frames, unless `--service-env RICE_REGIONS=false`;
  LitServe's answer is only the embedding);
- LitServe (bench/peer_litserve_api.py, in its own process group): a `LitAPI` whose decode_request
  decodes the upload, whose batch/predict encodes the frames of up to max_batch_size requests in
  one `EncoderEngine.encode` call (max_batch_size = the frame budget / frames per request,
  batch_timeout = the same wait), one worker.

Workloads: image requests (one still each) and clip requests (10 frames sampled from a 20-frame
clip), closed-loop clients, multipart uploads to both. Rounds alternate which server goes first;
the ratio ours/LitServe is reported per round and as the median.

    PYTHONPATH=. .venv/bin/python bench/peer_litserve.py [--image-clients 32] [--clip-clients 8] [--seconds 15] [--rounds 3] \
        [--runtime torch|onnx] [--precision fp32|int8] [--service-env RICE_REGIONS=false]

Needs the `bench` extra (`pip install -e .[bench]`: litserve).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from model.checkpoint import default_encoder
from pipeline.engine import EncoderEngine
from service.server import free_port
from tools.clipsynth import encode_video
from tools.democatalog import make_products, render_clip
from tools.service_process import serve

ROOT = Path(__file__).resolve().parents[1]
CLIP_FRAMES = 10


@dataclass(frozen=True)
class Runtime:
    """The encoder runtime both servers use: torch eager, or ONNX Runtime at a precision, from one export cache."""

    name: str = "torch"  # torch | onnx
    precision: str = "fp32"  # fp32 | int8 (ONNX only)
    onnx_dir: str = str(ROOT / "data" / "onnx")

    @property
    def expected(self) -> str:
        """`EncoderEngine.runtime` when this runtime is in use ('torch', 'onnx-fp32', 'onnx-int8')."""
        return "torch" if self.name == "torch" else f"onnx-{self.precision}"

    def engine(self, threads: int) -> EncoderEngine:
        return EncoderEngine(default_encoder(), "cpu", threads, runtime=self.name, onnx_precision=self.precision, onnx_dir=self.onnx_dir)


def service_env(batch_frames: int, wait_ms: float, threads: int, runtime: Runtime) -> dict[str, str]:
    """The RICE_* variables of our side: the same batch, wait, threads and runtime as LitServe's."""
    return {
        "RICE_GALLERY_PATH": ":memory:",
        "RICE_MAX_BATCH_SIZE": str(batch_frames),
        "RICE_MAX_WAIT_MS": str(wait_ms),
        "RICE_TORCH_THREADS": str(threads),
        # explicit, also for torch: the service's default (auto) is ONNX Runtime on a CPU
        "RICE_ENCODER_RUNTIME": runtime.name,
        "RICE_ONNX_PRECISION": runtime.precision,
        "RICE_ONNX_DIR": runtime.onnx_dir,
    }


def served_runtime(metrics_text: str) -> str | None:
    """The runtime label of the service's rice_model_info metric (what verification let serve)."""
    for line in metrics_text.splitlines():
        if line.startswith("rice_model_info{"):
            m = re.search(r'runtime="([^"]*)"', line)
            return m.group(1) if m else None
    return None


@contextmanager
def litserve(kind: str, max_batch_size: int, wait_ms: float, threads: int, runtime: Runtime) -> Iterator[str]:
    port = free_port()
    args = [sys.executable, str(ROOT / "bench" / "peer_litserve_api.py"), kind, str(port), str(max_batch_size), str(wait_ms), str(threads)]
    args += [runtime.name, runtime.precision, runtime.onnx_dir]
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-clients", type=int, default=32)
    p.add_argument("--clip-clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-frames", type=int, default=32, help="frames per encoder batch, both servers")
    p.add_argument("--wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=2, help="encoder threads (torch or ONNX Runtime intra-op), both servers")
    p.add_argument("--runtime", choices=("torch", "onnx"), default="torch", help="encoder runtime, both servers")
    p.add_argument("--precision", choices=("fp32", "int8"), default="fp32", help="ONNX Runtime precision, both servers")
    p.add_argument("--onnx-dir", default=Runtime.onnx_dir, help="ONNX export cache, shared by both servers")
    p.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="RICE_NAME=VALUE",
        help="an extra setting of our side only (repeatable), e.g. RICE_REGIONS=false: no region crops, so a clip costs the "
        "encoder the same frames as LitServe's",
    )
    return p


def extra_env(pairs: list[str]) -> dict[str, str]:
    """--service-env RICE_NAME=VALUE pairs as a dict; anything else is refused (it would silently do nothing)."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.startswith("RICE_"):
            raise SystemExit(f"--service-env expects RICE_NAME=VALUE, got {pair!r}")
        out[name] = value
    return out


def main() -> None:
    args = parser().parse_args()
    runtime = Runtime(args.runtime, args.precision, args.onnx_dir)

    import cv2

    products = make_products(8, seed=4)
    rng = np.random.default_rng(0)
    images = [cv2.imencode(".jpg", pr.image)[1].tobytes() for pr in products]
    clips = [encode_video(render_clip(pr, rng, num_frames=20, scale=(0.8, 0.95))) for pr in products]
    env = service_env(args.batch_frames, args.wait_ms, args.threads, runtime) | extra_env(args.service_env)
    workloads = [
        ("image", images, args.image_clients, "/v1/recognize/image", {}, 1),
        ("clip", clips, args.clip_clients, "/v1/recognize", {"num_frames": CLIP_FRAMES}, CLIP_FRAMES),
    ]
    summary = []
    print(f"runtime on both sides: {runtime.expected}; our side's extra settings: {extra_env(args.service_env) or 'none'}", flush=True)
    # the service starts first and is ready only once its encoder is (exported, verified and warm): the
    # LitServe workers then load the same graph from the cache instead of exporting it beside it
    with serve(env) as (ours, _):
        got_runtime = served_runtime(httpx.get(f"{ours}/metrics", timeout=30).text)
        if got_runtime != runtime.expected:
            raise RuntimeError(f"the service's encoder runs {got_runtime}, not {runtime.expected}")
        for kind, payloads, clients, path, params, frames in workloads:
            ls_batch = max(1, args.batch_frames // frames)
            with litserve(kind, ls_batch, args.wait_ms, args.threads, runtime) as peer:
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
