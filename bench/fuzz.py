"""Long fuzz run: thousands of seeded mutations (tools/mediafuzz.py) against a real `rice serve`
process, --concurrency at a time; a valid clip after every --batch cases.

Reports the answers by status and error code for each source, worker deaths by cause (from
/metrics), the cases that killed a decode worker (source + seed: add them to
tests/test_fuzz.py's KNOWN_CRASHERS), any answer >= 500 (there must be none), whether the
server process is still alive, and cases per second.

    .venv/bin/python bench/fuzz.py [--cases 3000] [--seed 1] [--concurrency 3] [--batch 250]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tools.mediafuzz import Case, cases, source
from tools.service_process import serve

ROOT = Path(__file__).resolve().parents[1]


def _deaths(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("rice_decode_worker_deaths_total{"):
            key, value = line.rsplit(" ", 1)
            out[key.split('"')[1]] = float(value)
    return out


def _send(c: httpx.Client, fz: Case) -> httpx.Response:
    if fz.is_clip:
        return c.post("/v1/recognize", params={"num_frames": 4}, files={"file": ("upload", fz.data)})
    return c.post("/v1/recognize/image", files={"file": ("upload", fz.data)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=3)
    ap.add_argument("--batch", type=int, default=250, help="a valid clip must work after every this many cases")
    args = ap.parse_args()

    by_source: dict[str, Counter[str]] = defaultdict(Counter)
    server_errors: list[str] = []
    crashers: list[str] = []
    valid_after_batch: list[bool] = []
    workdir = tempfile.mkdtemp(prefix="rice-fuzz-")
    with serve({"RICE_GALLERY_PATH": f"{workdir}/gallery.db"}, log_level="error", quiet=True) as (url, server):
        all_cases = list(cases(args.cases, args.seed))
        started = time.perf_counter()
        with httpx.Client(base_url=url, timeout=120) as c, ThreadPoolExecutor(args.concurrency) as pool:
            for start in range(0, len(all_cases), args.batch):
                batch = all_cases[start : start + args.batch]
                for fz, r in zip(batch, pool.map(lambda fz: _send(c, fz), batch), strict=True):
                    code = r.json()["error"]["code"] if r.status_code >= 400 else "ok"
                    by_source[fz.source][f"{r.status_code} {code}"] += 1
                    if r.status_code >= 500:
                        server_errors.append(f"{fz}: {r.status_code} {r.text[:200]}")
                    if code == "undecodable_media":
                        crashers.append(f"({fz.source!r}, {fz.seed})  # {'; '.join(fz.ops)}")
                ok = c.post("/v1/recognize", params={"num_frames": 4}, files={"file": ("ok.mp4", source("mp4_mp4v"))})
                valid_after_batch.append(ok.status_code == 200)
                print(f"{start + len(batch)} cases, server alive: {server.poll() is None}", file=sys.stderr, flush=True)
        seconds = time.perf_counter() - started
        deaths = _deaths(url)
        alive = server.poll() is None
    print(
        json.dumps(
            {
                "cases": args.cases,
                "seed": args.seed,
                "cases_per_s": round(args.cases / seconds, 1),
                "server_alive_at_end": alive,
                "valid_clip_ok_after_every_batch": all(valid_after_batch),
                "answers_5xx": server_errors,
                "worker_deaths": deaths,
                "answers_by_source": {k: dict(v) for k, v in sorted(by_source.items())},
                "undecodable_cases": crashers,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
