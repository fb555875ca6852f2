"""bench/lpr4m_convert.py at test size (2,000 training frames): the generated release converts in both
img2dataset formats, the failed count equals the parquets', nothing is extracted, and a re-run redoes
nothing. (The 1,000,000-frame run and its figures are in docs/RESULTS.md.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lpr4m_convert_bench", ROOT / "bench" / "lpr4m_convert.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["files", "webdataset"])
def test_generated_release_converts(tmp_path: Path, fmt: str) -> None:
    bench = _bench()
    expected = bench.generate(tmp_path / "release", 2_000, fmt, clip_frames=50, test_clips=20)
    parquet_failed = sum(
        s != "success"
        for f in sorted((tmp_path / "release").glob("*/*.parquet"))
        for s in pq.read_table(f, columns=["status"])["status"].to_pylist()
    )
    result = bench.convert(tmp_path / "release", tmp_path / "out")
    s = result["summary"]
    assert s["failed_downloads"] == parquet_failed == expected["failed_downloads"] > 0
    assert s["train_clips_total"] == 40 and 0 < s["train_clips"] <= 40
    assert s["train_frames_kept"] == 10 * s["train_clips"]  # the 10 sampled frames per clip, not all 50
    assert s["test_queries"] > 0 and s["train_parts"] == 10
    assert not any(p.is_dir() for p in (tmp_path / "out").iterdir())  # tars read in place; no folders written
    rows = [json.loads(x) for f in sorted((tmp_path / "out").glob("train-part-*.jsonl")) for x in f.read_text().splitlines()]
    assert len(rows) == s["train_clips"] and all(len(r["clip"]) == 10 for r in rows)
    again = bench.convert(tmp_path / "release", tmp_path / "out")["summary"]
    assert again["shards_indexed_now"] == 0 and again["train_parts_skipped"] == 10
    assert again["failed_downloads"] == s["failed_downloads"] and again["train_clips"] == s["train_clips"]
