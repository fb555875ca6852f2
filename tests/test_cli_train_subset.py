"""`rice train --skus FILE --limit N`: training on a subset of the manifest (the README's quick
start on part of a dataset); the held-out list written by tools.grocery_clips (--exclude-skus)
composes with both. The row count is read back from the trainer's own check."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_rice_train import _train_args, _video_dataset
from train.train import run


@pytest.mark.parametrize(
    ("extra", "rows"),
    [
        (["--limit", "3"], 3),  # 12 rows, the first 3
        (["--skus", "only.txt"], 4),  # sku0 and sku1, two clips each
        (["--skus", "only.txt", "--exclude-skus", "held.txt"], 2),  # sku1 held out
        (["--skus", "only.txt", "--limit", "1"], 1),
    ],
)
def test_subset_flags_choose_the_training_rows(tmp_path: Path, extra: list[str], rows: int) -> None:
    manifest = _video_dataset(tmp_path)  # 6 products x 2 clips
    (tmp_path / "only.txt").write_text("sku0\nsku1\n")
    (tmp_path / "held.txt").write_text("sku1\n")
    flags = [str(tmp_path / x) if x.endswith(".txt") else x for x in extra]
    args = _train_args(manifest, tmp_path / "out", *flags, "--batch-size", "8")  # 8 > every subset: the trainer reports the count
    with pytest.raises(ValueError, match=rf"^{rows} rows are fewer than one global batch \(8\)"):
        run(args)
