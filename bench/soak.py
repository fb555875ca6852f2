"""Soak: mixed traffic against the real service for a long time, resident memory every 10 s.

Starts `rice serve` (separate process, default encoder, embedded gallery) and drives it with
--clients closed-loop clients, each request drawn at random: clip recognitions, image
recognitions, catalog ingests, deletes of earlier ingests, and about 10% bad uploads (mutations
from tools/mediafuzz.py, the AVI/MJPEG crashers among them). Every --every seconds it records the
resident memory (RSS) of the server process and, separately, the proportional memory (PSS:
shared pages split) of its decode workers (every process below it). At the end: the answers by
status class, worker deaths by cause, the plateau bound (the largest server RSS after --warmup
seconds) and the slope of server RSS over the second half of the run, by least squares.

    .venv/bin/python bench/soak.py [--minutes 10] [--clients 3] [--every 10] [--out soak.jsonl]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import cv2
import httpx
import numpy as np

from tools.clipsynth import encode_video
from tools.mediafuzz import SOURCES, case
from tools.service_process import rss_mb, serve

ROOT = Path(__file__).resolve().parents[1]


def pss_mib(pid: int) -> float:
    """Proportional set size: shared pages (the forkserver's imports) split between the processes sharing them."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0.0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the forkserver and the decode workers)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _clip(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    return encode_video([np.roll(base, 3 * i, axis=1) for i in range(24)], fps=12.0)


def _image(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return cv2.imencode(".jpg", rng.integers(0, 255, (160, 160, 3), dtype=np.uint8))[1].tobytes()


class Traffic:
    """The request mix; thread-safe counters of what came back."""

    def __init__(self, url: str, seed: int) -> None:
        self.url = url
        self.clips = [_clip(i) for i in range(4)]
        self.images = [_image(i) for i in range(8)]
        self.statuses: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.ingested: list[str] = []
        self.lock = threading.Lock()
        self.fuzz_seed = seed

    def one(self, c: httpx.Client, rng: np.random.Generator) -> None:
        u = rng.random()
        if u < 0.10:  # bad upload: a mutation of any source, to the endpoint of its kind
            with self.lock:
                self.fuzz_seed += 1
                seed = self.fuzz_seed
            bad = case(SOURCES[seed % len(SOURCES)], seed)
            path = "/v1/recognize" if bad.is_clip else "/v1/recognize/image"
            kind, r = "bad", c.post(path, params={"num_frames": 4}, files={"file": ("x", bad.data)})
        elif u < 0.60:
            clip = self.clips[int(rng.integers(len(self.clips)))]
            kind, r = "clip", c.post("/v1/recognize", params={"num_frames": 8}, files={"file": ("c.mp4", clip)})
        elif u < 0.75:
            img = self.images[int(rng.integers(len(self.images)))]
            kind, r = "image", c.post("/v1/recognize/image", files={"file": ("i.jpg", img)})
        elif u < 0.90:
            img = self.images[int(rng.integers(len(self.images)))]
            sku = f"sku-{int(rng.integers(0, 200))}"
            kind, r = "ingest", c.post("/v1/gallery/items", files={"image": ("i.jpg", img)}, data={"sku": sku})
            if r.status_code == 201:
                with self.lock:
                    self.ingested.append(r.json()["item_id"])
        else:
            with self.lock:
                item = self.ingested.pop(0) if self.ingested else "missing-item"
            kind, r = "delete", c.delete(f"/v1/gallery/items/{item}")
        with self.lock:
            self.kinds[kind] += 1
            self.statuses[f"{r.status_code // 100}xx"] += 1
            if r.status_code >= 500:
                self.statuses[f"5xx {kind} {r.text[:80]}"] += 1


def _metric_lines(url: str, name: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--every", type=float, default=10.0, help="seconds between RSS samples")
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before the plateau bound counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write every sample as JSON lines here")
    args = ap.parse_args()

    samples: list[dict[str, float]] = []
    workdir = tempfile.mkdtemp(prefix="rice-soak-")
    with serve({"RICE_GALLERY_PATH": f"{workdir}/gallery.db"}, log_level="warning", quiet=False) as (url, server):
        traffic = Traffic(url, args.seed)
        stop = threading.Event()

        def client(i: int) -> None:
            rng = np.random.default_rng([args.seed, i])
            with httpx.Client(base_url=url, timeout=120) as c:
                while not stop.is_set():
                    try:
                        traffic.one(c, rng)
                    except (httpx.HTTPError, ValueError, KeyError) as e:  # count it; a dead client would skew the mix
                        with traffic.lock:
                            traffic.statuses[f"transport {type(e).__name__}"] += 1

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        started = time.monotonic()
        for t in threads:
            t.start()
        out = Path(args.out).open("w") if args.out else None  # noqa: SIM115  # closed after the loop
        while (elapsed := time.monotonic() - started) < args.minutes * 60:
            workers = descendants(server.pid)
            with traffic.lock:
                requests = sum(traffic.kinds.values())
            s = {
                "t_s": round(elapsed, 1),
                "server_rss_mib": round(rss_mb(server.pid), 1),
                "workers_pss_mib": round(sum(pss_mib(p) for p in workers), 1),
                "workers": len(workers),
                "requests": requests,
            }
            samples.append(s)
            print(json.dumps(s), flush=True)
            if out:
                out.write(json.dumps(s) + "\n")
            if server.poll() is not None:
                raise SystemExit(f"the server died (exit status {server.returncode})")
            time.sleep(args.every)
        stop.set()
        for t in threads:
            t.join(timeout=180)
        if out:
            out.close()
        deaths = _metric_lines(url, "rice_decode_worker_deaths_total")
        alive = server.poll() is None

    ts = np.array([s["t_s"] for s in samples])
    rss = np.array([s["server_rss_mib"] for s in samples])
    half = ts >= ts[-1] / 2
    slope = float(np.polyfit(ts[half] / 60, rss[half], 1)[0]) if half.sum() >= 2 else float("nan")
    after = rss[ts >= args.warmup]
    summary = {
        "minutes": args.minutes,
        "clients": args.clients,
        "requests": dict(traffic.kinds),
        "answers": dict(traffic.statuses),
        "worker_deaths": {k.split('"')[1]: v for k, v in deaths.items() if '"' in k},
        "server_alive_at_end": alive,
        "server_rss_mib": {"first": float(rss[0]), "last": float(rss[-1]), "max_after_warmup": float(after.max()) if len(after) else None},
        "server_rss_slope_mib_per_min_second_half": round(slope, 2),
        "workers_pss_mib": {"first": samples[0]["workers_pss_mib"], "last": samples[-1]["workers_pss_mib"]},
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
