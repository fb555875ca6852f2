"""`rice timeline FILE... --url URL`: which product was on screen when, for recordings of any length.

Each recording is uploaded as a timeline job (streamed from disk), a progress bar follows the
job's progress, and the segments are printed as a table; `--csv` and `--json` write them to files.
Ctrl-C cancels the running job on the server.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20
_COLUMNS = ("file", "start_s", "end_s", "sku", "score", "item_id", "match")


def add_parser(sub: Any) -> None:
    """Register `rice timeline` on the CLI's subparsers."""
    t = sub.add_parser(
        "timeline",
        help="which product was on screen when: long recordings as timeline jobs, with a progress bar",
        description="Uploads each recording as a timeline job (POST /v1/jobs/timeline), follows its progress and prints the "
        "segments. Ctrl-C cancels the job on the server.",
    )
    t.add_argument("paths", nargs="+", help="recording files")
    t.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    t.add_argument("--shop-id", help="search only this shop's items")
    t.add_argument("--window-s", type=float, default=2.0, help="seconds pooled into one search")
    t.add_argument("--stride-s", type=float, help="seconds between window starts (default: the window)")
    t.add_argument("--top-k", type=int, default=3, help="the SKU and its alternatives per segment")
    t.add_argument("--min-score", type=float, help="score from which a segment is a match (default: the model's)")
    t.add_argument("--csv", help="write every segment to this CSV file")
    t.add_argument("--json", help="write the full answers to this JSON file")
    t.add_argument("--api-key", default=None, help="API key (or RICE_CLIENT_API_KEY)")
    t.add_argument("--poll-s", type=float, default=0.5, help="how often to ask for progress")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=run)


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def _params(args: argparse.Namespace) -> dict[str, str | int | float]:
    params: dict[str, str | int | float] = {"window_s": args.window_s, "top_k": args.top_k}
    for key in ("shop_id", "stride_s", "min_score"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    return params


def _follow(client: Any, job_id: str, label: str, poll_s: float, quiet: bool) -> dict[str, Any]:
    """Poll the job until it ends, feeding a progress bar (percent of the recording processed)."""
    from tqdm import tqdm

    with tqdm(total=100, desc=label, unit="%", disable=quiet, bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}]") as bar:
        while True:
            job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
            bar.update(max(0.0, 100 * job.get("progress", 0.0) - bar.n))
            if job.get("status") in ("done", "failed", "cancelled"):
                return job
            time.sleep(poll_s)


def _table(path: str, result: dict[str, Any]) -> str:
    lines = [f"{path} ({result['duration_s']:.1f} s, {len(result['segments'])} segments)"]
    for s in result["segments"]:
        what = s["sku"] or "-"
        score = f"{s['score']:.3f}" if s["score"] is not None else ""
        also = ", ".join(f"{a['sku']} {a['score']:.2f}" for a in s["alternatives"])
        lines.append(f"  {_clock(s['start_s'])} - {_clock(s['end_s'])}  {what:<20} {score:>6}  {'match' if s['match'] else ''}  ({also})")
    return "\n".join(lines)


def _clock(seconds: float) -> str:
    m, s = divmod(seconds, 60)
    h, m = divmod(int(m), 60)
    return f"{h:d}:{m:02d}:{s:05.2f}"


def run(args: argparse.Namespace) -> int:
    """Run every file as a job; exit status 1 if any failed (its error printed), 130 on Ctrl-C."""
    import httpx

    from tools.client import api_error

    paths = [Path(p) for p in args.paths]
    for path in paths:  # a missing file is the user's to fix before anything is uploaded (exit 2)
        if not path.is_file():
            raise FileNotFoundError(2, "no such recording file", str(path))
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    answers: list[dict[str, Any]] = []
    failed = 0
    with httpx.Client(base_url=args.url, headers=headers, timeout=httpx.Timeout(60.0, write=600.0)) as client:
        for path in paths:
            r = client.post("/v1/jobs/timeline", params=_params(args), content=_chunks(path))
            if r.status_code != 202:
                error = api_error(r)
                if r.status_code in (401, 403, 404) or error.code in ("invalid_request", "bad_request") or r.status_code >= 429:
                    raise error  # the key, the URL, a parameter or the service: no other file would fare better
                print(f"{path}: {error.message}", file=sys.stderr)  # this file (too large, not a recording)
                answers.append({"path": str(path), "status": "rejected", "error": {"code": error.code, "message": error.detail}})
                failed += 1
                continue
            job_id = r.json()["job_id"]
            try:
                job = _follow(client, job_id, path.name, args.poll_s, args.quiet)
            except KeyboardInterrupt:
                client.delete(f"/v1/jobs/{job_id}")
                print(f"{path}: cancelled job {job_id}", file=sys.stderr)
                return 130
            answers.append({"path": str(path), **job})
            if job["status"] == "done":
                print(_table(str(path), job["result"]))
            else:
                failed += 1
                print(f"{path}: job {job['status']}: {(job.get('error') or {}).get('message', '')}", file=sys.stderr)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(_COLUMNS)
            for a in answers:
                for s in (a.get("result") or {}).get("segments", []):
                    w.writerow(
                        [
                            a["path"],
                            s["start_s"],
                            s["end_s"],
                            s["sku"] or "",
                            s["score"] if s["score"] is not None else "",
                            s["item_id"] or "",
                            s["match"],
                        ]
                    )
    if args.json:
        Path(args.json).write_text(json.dumps(answers, indent=2) + "\n")
    return 1 if failed else 0
