"""Timeline evaluation on generated long recordings with known segments, through a real service.

Starts `rice serve` as a subprocess (so its memory is its own), ingests a generated catalog, and:

1. accuracy: generated recordings (gallery products in turn, gaps, products that come back,
   distractor products the shop does not sell) go through timeline jobs; segment precision and
   recall (a segment is right when it names the true SKU and overlaps its true segment with
   IoU >= 0.5), boundary error in seconds (for every true product segment found), and throughput
   (recording seconds per wall second, submit to done);
2. `--long-minutes N`: one long recording (1080p by default) goes through `rice timeline` (the
   progress bar) while the server's and the decoder process's peak RSS are sampled; then the same
   recording is submitted again and cancelled part way.

    python bench/timeline_eval.py --recordings 3 --minutes 3 --short 10 --long-minutes 30 --workdir /tmp/timeline-eval
    # without smoothing (per-window argmax above the threshold), for comparison:
    python bench/timeline_eval.py --recordings 3 --minutes 3 --workdir /tmp/timeline-eval \
        --set RICE_TIMELINE_SWITCH_COST=0 --set RICE_TIMELINE_MIN_CONTRAST=0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np

from service.server import free_port
from tools.democatalog import DemoProduct, make_products
from tools.longclip import Part, TruthSegment, plan_recording, truth_of, write_recording


def catalog() -> tuple[list[DemoProduct], list[DemoProduct]]:
    """The gallery (eight products) and four distractors the gallery does not hold."""
    gallery = make_products(8, seed=4)
    distractors = [dataclasses.replace(p, sku=f"NOT-IN-GALLERY-{i}") for i, p in enumerate(make_products(4, seed=99))]
    return gallery, distractors


def generate(path: Path, minutes: float, seed: int, size: tuple[int, int], fps: float) -> list[TruthSegment]:
    """The recording at `path` (generated once, then reused) and its true segments."""
    gallery, distractors = catalog()
    rng = np.random.default_rng(seed)
    parts = plan_recording([p.sku for p in gallery], [p.sku for p in distractors], minutes * 60, rng)
    if not path.exists():
        tmp = path.with_suffix(".partial.mp4")
        write_recording(parts, gallery + distractors, tmp, seed=seed, fps=fps, size=size)
        tmp.rename(path)
    return truth_of(parts, fps)


def _iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def score_timeline(segments: list[dict[str, Any]], truth: list[TruthSegment]) -> dict[str, Any]:
    """Segment precision/recall at IoU >= 0.5 with the right SKU, and boundary errors of found segments."""
    predicted = [s for s in segments if s["sku"]]
    true = [t for t in truth if t.sku]
    right = [p for p in predicted if any(p["sku"] == t.sku and _iou((p["start_s"], p["end_s"]), (t.start_s, t.end_s)) >= 0.5 for t in true)]
    errors: list[float] = []
    found = 0
    for t in true:
        best = max(
            (p for p in predicted if p["sku"] == t.sku), key=lambda p: _iou((p["start_s"], p["end_s"]), (t.start_s, t.end_s)), default=None
        )
        if best is not None and _iou((best["start_s"], best["end_s"]), (t.start_s, t.end_s)) >= 0.5:
            found += 1
            errors += [abs(best["start_s"] - t.start_s), abs(best["end_s"] - t.end_s)]
    return {"predicted": len(predicted), "correct": len(right), "true": len(true), "found": found, "boundary_errors": errors}


class Server:
    """`rice serve` in a subprocess on a free port, with its own gallery and job directory."""

    def __init__(self, workdir: Path, overrides: dict[str, str]) -> None:
        self.port = free_port()
        env = dict(os.environ, **overrides)
        env.update(
            RICE_GALLERY_PATH=str(workdir / "gallery.db"),
            RICE_JOB_DIR=str(workdir / "jobs"),
            RICE_PORT=str(self.port),
            RICE_LOG_LEVEL="warning",
        )
        (workdir / "gallery.db").unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve"], env=env, cwd=Path(__file__).resolve().parent.parent)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the service did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


class RssSampler:
    """The server's RSS when sampling starts and its highest sampled RSS, and the highest RSS any
    of its decoder children reached (every 0.2 s)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start_kb = _status_kb(pid, "VmRSS")
        self.peak_kb = self.start_kb
        self.child_peak_kb = 0
        self.children_seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_kb = max(self.peak_kb, _status_kb(self.pid, "VmRSS"))
            for child in _children(self.pid):
                self.children_seen.add(child)
                self.child_peak_kb = max(self.child_peak_kb, _status_kb(child, "VmHWM"))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {
            "server_rss_before_mb": self.start_kb / 1024,
            "server_peak_rss_during_mb": self.peak_kb / 1024,
            "server_growth_mb": (self.peak_kb - self.start_kb) / 1024,
            "decoder_peak_rss_mb": self.child_peak_kb / 1024,
        }


def ingest(url: str, products: list[DemoProduct]) -> None:
    for p in products:
        _, buf = cv2.imencode(".jpg", p.image, [cv2.IMWRITE_JPEG_QUALITY, 92])
        r = httpx.post(f"{url}/v1/gallery/items", files={"image": ("p.jpg", buf.tobytes(), "image/jpeg")}, data={"sku": p.sku}, timeout=60)
        r.raise_for_status()


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk


def submit(url: str, path: Path) -> str:
    """Upload `path` as a timeline job, streamed (a long recording never sits in this process either)."""
    r = httpx.post(f"{url}/v1/jobs/timeline", content=_chunks(path), timeout=600)
    r.raise_for_status()
    return str(r.json()["job_id"])


def run_job(url: str, path: Path) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    job_id = submit(url, path)
    while True:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job, time.perf_counter() - started
        time.sleep(0.5)


def evaluate(url: str, workdir: Path, recordings: int, minutes: float) -> dict[str, Any]:
    totals: dict[str, Any] = {"predicted": 0, "correct": 0, "true": 0, "found": 0, "boundary_errors": [], "seconds": 0.0, "wall_s": 0.0}
    for i in range(recordings):
        path = workdir / f"eval_{i}_{minutes:g}min.mp4"
        truth = generate(path, minutes, seed=100 + i, size=(320, 240), fps=10)
        job, wall = run_job(url, path)
        assert job["status"] == "done", job
        scored = score_timeline(job["result"]["segments"], truth)
        for key in ("predicted", "correct", "true", "found"):
            totals[key] += scored[key]
        totals["boundary_errors"] += scored["boundary_errors"]
        totals["seconds"] += job["result"]["duration_s"]
        totals["wall_s"] += wall
        right, found = f"{scored['correct']}/{scored['predicted']}", f"{scored['found']}/{scored['true']}"
        print(f"recording {i}: {right} segments right, {found} true segments found, {wall:.1f} s")
    errors = np.array(totals.pop("boundary_errors") or [0.0])
    return {
        "recordings": recordings,
        "minutes_each": minutes,
        "segment_precision": totals["correct"] / max(totals["predicted"], 1),
        "segment_recall": totals["found"] / max(totals["true"], 1),
        "boundary_error_mean_s": float(errors.mean()),
        "boundary_error_p90_s": float(np.quantile(errors, 0.9)),
        "boundary_error_max_s": float(errors.max()),
        "throughput_recording_s_per_wall_s": totals["seconds"] / totals["wall_s"],
        **totals,
    }


def short_checks(url: str, workdir: Path, n: int, first_seed: int = 1000) -> dict[str, Any]:
    """`n` random 21 s recordings (product A, nothing, B, C; random products, part lengths and
    camera paths) through POST /v1/recognize/timeline: how many come back with A, B, C in order
    and every boundary within 1.5 s."""
    gallery, _ = catalog()
    passed, worst = 0, 0.0
    for i in range(n):
        rng = np.random.default_rng(first_seed + i)
        a, b, c = (gallery[j] for j in rng.choice(len(gallery), 3, replace=False))
        cuts = np.sort(rng.uniform(4.0, 17.0, 3))
        while np.diff(cuts).min() < 3.5 or cuts[0] < 4.0 or 21 - cuts[2] < 4.0:
            cuts = np.sort(rng.uniform(4.0, 17.0, 3))
        lengths = np.diff([0.0, *cuts, 21.0])
        parts = [Part(a.sku, lengths[0]), Part(None, lengths[1]), Part(b.sku, lengths[2]), Part(c.sku, lengths[3])]
        path = workdir / f"short_{first_seed + i}.mp4"
        truth = write_recording(parts, gallery, path, seed=first_seed + i, fps=10)
        r = httpx.post(f"{url}/v1/recognize/timeline", content=path.read_bytes(), timeout=600)
        r.raise_for_status()
        shown = [s for s in r.json()["segments"] if s["sku"]]
        true = [t for t in truth if t.sku]
        ok = [s["sku"] for s in shown] == [t.sku for t in true]
        errors = [max(abs(s["start_s"] - t.start_s), abs(s["end_s"] - t.end_s)) for s, t in zip(shown, true, strict=False)] if ok else []
        ok = ok and max(errors) <= 1.5
        worst = max([worst, *errors])
        passed += ok
        print(f"short {i}: {'pass' if ok else 'FAIL'} {[s['sku'] for s in r.json()['segments']]}")
    return {"recordings": n, "first_seed": first_seed, "passed": passed, "worst_boundary_error_s_of_passing_order": worst}


def priority_check(url: str, workdir: Path, requests: int) -> dict[str, Any]:
    """Clip latency (POST /v1/recognize, one client after another) with the service idle, then
    while a timeline job keeps the encoder busy: job frames wait behind interactive ones."""
    from tools.clipsynth import encode_video
    from tools.democatalog import render_clip

    gallery, _ = catalog()
    clip = encode_video(render_clip(gallery[0], np.random.default_rng(0), num_frames=20, scale=(0.8, 0.95), occlusion=False))

    def latencies() -> list[float]:
        out = []
        for _ in range(requests):
            t = time.perf_counter()
            httpx.post(f"{url}/v1/recognize", content=clip, timeout=120).raise_for_status()
            out.append(time.perf_counter() - t)
        return out

    idle = latencies()
    path = workdir / "eval_0_3min.mp4"
    generate(path, 3.0, seed=100, size=(320, 240), fps=10)
    job_id = submit(url, path)
    while httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()["status"] != "running":
        time.sleep(0.2)
    busy = latencies()
    job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
    httpx.delete(f"{url}/v1/jobs/{job_id}", timeout=30)
    return {
        "requests": requests,
        "idle_p50_ms": 1e3 * float(np.median(idle)),
        "idle_p95_ms": 1e3 * float(np.quantile(idle, 0.95)),
        "during_job_p50_ms": 1e3 * float(np.median(busy)),
        "during_job_p95_ms": 1e3 * float(np.quantile(busy, 0.95)),
        "job_still_running_at_end": job["status"] == "running",
        "job_progress_at_end": job["progress"],
    }


def long_run(server: Server, workdir: Path, minutes: float, size: tuple[int, int], fps: float) -> dict[str, Any]:
    path = workdir / f"long_{minutes:g}min_{size[1]}p_{fps:g}fps.mp4"
    t = time.perf_counter()
    generate(path, minutes, seed=7, size=size, fps=fps)
    print(f"long recording: {path.stat().st_size / 1e6:.0f} MB ({time.perf_counter() - t:.0f} s to generate or find)")
    # The same measurement on a 3-minute recording first: flat memory means the same growth.
    short = workdir / "eval_0_3min.mp4"
    generate(short, 3.0, seed=100, size=(320, 240), fps=10)
    sampler = RssSampler(server.proc.pid)
    run_job(server.url, short)
    memory_3min = sampler.stop()
    sampler = RssSampler(server.proc.pid)
    t = time.perf_counter()
    cli = subprocess.run(
        [sys.executable, "-m", "tools.cli", "timeline", str(path), "--url", server.url, "--json", str(workdir / "long.json")], check=False
    )
    wall = time.perf_counter() - t
    memory = sampler.stop()
    result = json.loads((workdir / "long.json").read_text())[0]
    out: dict[str, Any] = {"minutes": minutes, "size": f"{size[0]}x{size[1]}", "fps": fps, "file_mb": path.stat().st_size / 1e6}
    out.update(memory, cli_exit=cli.returncode, status=result["status"], wall_s=wall, memory_3min_320x240=memory_3min)
    if result["status"] == "done":
        out["throughput_recording_s_per_wall_s"] = result["result"]["duration_s"] / wall
        out["segments"] = len(result["result"]["segments"])

    # Cancel part way: submit again, wait for progress >= 0.2, DELETE, and see the decoder go.
    job_id = submit(server.url, path)
    while httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=30).json()["progress"] < 0.2:
        time.sleep(1)
    decoders = [c for c in _children(server.proc.pid) if b"stream_decode" in Path(f"/proc/{c}/cmdline").read_bytes()]
    t = time.perf_counter()
    cancelled = httpx.delete(f"{server.url}/v1/jobs/{job_id}", timeout=30).json()
    while any(Path(f"/proc/{c}").exists() and "Z" not in Path(f"/proc/{c}/stat").read_text().rsplit(")", 1)[1][:3] for c in decoders):
        time.sleep(0.1)
    out["cancel"] = {
        "status_after_delete": cancelled["status"],
        "progress_when_cancelled": cancelled["progress"],
        "decoder_gone_after_s": time.perf_counter() - t,
        "status_later": httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=30).json()["status"],
    }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recordings", type=int, default=3, help="recordings for the accuracy evaluation")
    ap.add_argument("--minutes", type=float, default=3.0, help="length of each evaluation recording")
    ap.add_argument("--short", type=int, default=0, help="also check this many random 21 s A/nothing/B/C recordings")
    ap.add_argument("--short-seed", type=int, default=1000, help="seed of the first of them")
    ap.add_argument("--priority", type=int, default=0, help="also time this many clips idle and while a job runs")
    ap.add_argument("--long-minutes", type=float, default=0.0, help="also run one recording this long (0 = skip)")
    ap.add_argument("--long-size", default="1920x1080")
    ap.add_argument("--long-fps", type=float, default=5.0)
    ap.add_argument("--workdir", default="timeline_eval_out", help="generated recordings (reused), gallery, job uploads")
    ap.add_argument(
        "--set", action="append", default=[], metavar="RICE_X=V", help="a server setting, e.g. RICE_TIMELINE_SWITCH_COST=0 (repeatable)"
    )
    args = ap.parse_args()
    workdir = Path(args.workdir)
    (workdir / "jobs").mkdir(parents=True, exist_ok=True)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    server = Server(workdir, overrides)
    try:
        gallery, _ = catalog()
        ingest(server.url, gallery)
        report: dict[str, Any] = {"cpus": os.cpu_count(), "settings": overrides}
        if args.recordings:
            report["accuracy"] = evaluate(server.url, workdir, args.recordings, args.minutes)
        if args.short:
            report["short"] = short_checks(server.url, workdir, args.short, args.short_seed)
        if args.priority:
            report["priority"] = priority_check(server.url, workdir, args.priority)
        if args.long_minutes:
            w, h = (int(x) for x in args.long_size.split("x"))
            report["long"] = long_run(server, workdir, args.long_minutes, (w, h), args.long_fps)
    finally:
        server.stop()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
