"""`rice lpr4m` at release scale: generate an LPR4M full release in img2dataset's layout and convert it,
measuring wall time and the converter's peak RSS (goal: 1,000,000 training frames in < 10 min, < 1 GB).

The release: --frames training frames in clips of --clip-frames (1 fps), one shop image per clip, a
small test split (--test-clips clips of 10 frames, 10 livestream galleries), 10 annotation parts,
img2dataset shards of 10,000 samples with `<shard>.parquet` for every URL and --fail of the samples
failed (parquet row only, as img2dataset leaves them). Both output formats, side by side:
- files: `<shard>/<key>.jpg` + `<key>.json` as EMPTY files: the converter only lists names (it never
  opens a frame), so their bytes do not matter to it;
- webdataset: `<shard>.tar` with the same members, EMPTY too: the converter reads tar headers only
  (member offsets), never the data.
Shop and test images are tiny real JPEGs (`--test-clips` are decoded by nothing here either).

The converter runs in a child process (`python -m train.lpr4m`); its peak RSS is the child's
ru_maxrss. The bench checks the failed count against the parquets and that no extracted folder exists.

    .venv/bin/python bench/lpr4m_convert.py [--frames 1000000] [--work /tmp/lpr4m_bench] [--formats files webdataset]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
PER_SHARD = 10_000


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16)))


class ShardWriter:
    """Writes samples as img2dataset does, a shard at a time (nothing held beyond one shard)."""

    def __init__(self, root: Path, fmt: str, payload: bytes = b"") -> None:
        self.root, self.fmt, self.payload = root, fmt, payload
        root.mkdir(parents=True, exist_ok=True)
        self.shard, self.rows, self.failed = 0, self._empty(), 0
        self.tar: tarfile.TarFile | None = None

    @staticmethod
    def _empty() -> dict[str, list[object]]:
        return {"url": [], "key": [], "status": [], "error_message": []}

    def add(self, name: str, ok: bool) -> None:
        i = len(self.rows["url"])
        key = f"{self.shard:05d}{i:04d}"
        url = f"https://cdn.example.com/lpr4m/{name}.jpg"
        self.rows["url"].append(url)
        self.rows["key"].append(key)
        self.rows["status"].append("success" if ok else "failed_to_download")
        self.rows["error_message"].append(None if ok else "HTTP Error 404")
        if ok:
            self._write(key, url)
        else:
            self.failed += 1
        if len(self.rows["url"]) == PER_SHARD:
            self.flush()

    def _write(self, key: str, url: str) -> None:
        meta = json.dumps({"url": url, "key": key, "status": "success"}).encode() if self.payload else b""
        if self.fmt == "webdataset":
            if self.tar is None:
                self.tar = tarfile.open(self.root / f"{self.shard:05d}.tar", "w")  # noqa: SIM115  (closed in flush)
            for member, data in ((f"{key}.jpg", self.payload), (f"{key}.json", meta)):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                self.tar.addfile(info, io.BytesIO(data))
        else:
            folder = self.root / f"{self.shard:05d}"
            folder.mkdir(exist_ok=True)
            for member, data in ((f"{key}.jpg", self.payload), (f"{key}.json", meta)):
                with open(folder / member, "wb") as f:
                    f.write(data)

    def flush(self) -> None:
        if not self.rows["url"]:
            return
        if self.tar is not None:
            self.tar.close()
            self.tar = None
        pq.write_table(pa.table(self.rows), self.root / f"{self.shard:05d}.parquet")
        (self.root / f"{self.shard:05d}_stats.json").write_text(json.dumps({"count": len(self.rows["url"])}))
        self.shard, self.rows = self.shard + 1, self._empty()


def tiny_jpeg(seed: int) -> bytes:
    import cv2

    img = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    return bytes(cv2.imencode(".jpg", img)[1])


def generate(
    root: Path, frames: int, fmt: str, clip_frames: int = 100, test_clips: int = 200, fail: float = 0.05, seed: int = 0
) -> dict[str, int]:
    """Write the release under root; returns what the conversion must report."""
    rng = np.random.default_rng(seed)
    ann = root / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    train_frames, train_images = ShardWriter(root / "train_frames", fmt), ShardWriter(root / "train_images", fmt, tiny_jpeg(1))
    clips = frames // clip_frames
    per_part = max(1, -(-clips // 10))
    live = _uuid(rng)
    part = None
    for c in range(clips):
        if c % per_part == 0:
            if part is not None:
                part.close()
            part = (ann / f"training_videoinfo_full_part_{c // per_part + 1:02d}.txt").open("w")
        clip = f"{live}-{c * 200_000}-{c * 200_000 + clip_frames * 1000}"
        fids = [f"{clip}-{i:04d}" for i in range(clip_frames)]
        for f in fids:
            train_frames.add(f, rng.random() >= fail)
        iid = _uuid(rng)
        train_images.add(f"{iid}-0", rng.random() >= fail)
        cols = [clip, json.dumps(fids), "[]", iid, "title", "3", "cat", "asr", "small", "long", "single"]
        assert part is not None
        part.write("\t".join(cols) + "\n")
    if part is not None:
        part.close()
    test_frames, shop = ShardWriter(root / "test_frames", fmt), ShardWriter(root / "test_images", fmt, tiny_jpeg(2))
    gt: dict[str, list[str]] = {}
    galleries: dict[str, list[str]] = {}
    lives = [_uuid(rng) for _ in range(10)]
    for q in range(test_clips):
        lv = lives[q % 10]
        iid = _uuid(rng)
        shop.add(f"{iid}-0", True)
        galleries.setdefault(lv, []).append(f"{iid}-0.jpg")
        clip = f"{lv}-{q * 10_000}-{q * 10_000 + 9000}"
        gt[clip] = [f"{iid}-0.jpg"]
        for i in range(10):
            test_frames.add(f"{clip}-{i:04d}", rng.random() >= fail)
    (ann / "test_videoid_to_gtimage_20079.json").write_text(json.dumps(gt))
    (ann / "test_liveid_to_gallery_110.json").write_text(json.dumps(galleries))
    writers = (train_frames, train_images, test_frames, shop)
    for w in writers:
        w.flush()
    return {"failed_downloads": sum(w.failed for w in writers), "train_clips_total": clips, "training_frames": clips * clip_frames}


def convert(root: Path, out: Path) -> dict[str, object]:
    """Run the converter in a child process; wall seconds, peak RSS (MB) and its summary."""
    images = [str(root / d) for d in ("train_frames", "train_images", "test_frames", "test_images")]
    cmd = [sys.executable, "-m", "train.lpr4m", "--annotations", str(root / "annotations"), "--images", *images, "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far (Linux: KiB)
    summary = json.loads((out / "summary.json").read_text())
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb), "summary": summary}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=1_000_000)
    p.add_argument("--clip-frames", type=int, default=100)
    p.add_argument("--work", default="/tmp/lpr4m_bench")
    p.add_argument("--formats", nargs="+", default=["files", "webdataset"])
    p.add_argument("--keep", action="store_true", help="leave the generated release on disk")
    args = p.parse_args()
    results = {}
    for fmt in args.formats:
        root = Path(args.work) / fmt
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        expected = generate(root / "release", args.frames, fmt, args.clip_frames)
        generated = time.perf_counter() - t0
        res = convert(root / "release", root / "out")
        s = res["summary"]
        assert isinstance(s, dict)
        assert s["failed_downloads"] == expected["failed_downloads"], (s["failed_downloads"], expected)
        assert not any(p.is_dir() for p in (root / "out").iterdir()), "an extracted folder was written"
        second = convert(root / "release", root / "out")  # resumed: everything already done
        results[fmt] = {
            "training_frames": expected["training_frames"],
            "generate_seconds": round(generated, 1),
            "convert_seconds": res["seconds"],
            "peak_rss_mb": res["peak_rss_mb"],
            "rerun_seconds": second["seconds"],
            "failed_downloads": s["failed_downloads"],
            "train_clips": f"{s['train_clips']}/{s['train_clips_total']}",
            "train_frames_kept": s["train_frames_kept"],
            "manifest_mb": round(sum(f.stat().st_size for f in (root / "out").glob("*.jsonl")) / 2**20, 1),
            "index_mb": round((root / "out" / "index.sqlite").stat().st_size / 2**20, 1),
        }
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        sys.stdout.write(json.dumps({fmt: results[fmt]}) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
