"""`train.lpr4m` on fixtures written in the published layouts: the full release as img2dataset leaves
it (`files` folders and webdataset tars, with failed downloads), and the authors' 750K subset. The
converted manifests then evaluate with `rice evaluate --per-shop` and train with `rice train`."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tarfile
import uuid
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tools.cli import main as rice_main
from train import evaluate, lpr4m, train
from train.data import read_image, read_manifest

TRAIN_LIVE = str(uuid.UUID(int=0xA1))
LIVE_1, LIVE_2 = str(uuid.UUID(int=0xB1)), str(uuid.UUID(int=0xB2))


def _jpeg(seed: int, size: tuple[int, int] = (48, 48)) -> bytes:
    """A distinct picture: random colour blocks (JPEG bytes, so equal seeds give equal files)."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = cv2.resize(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def _decoded(data: bytes) -> bytes:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return img.tobytes()


def _iid(n: int) -> str:
    return str(uuid.UUID(int=0xC000 + n))


class Img2Dataset:
    """Writes samples as img2dataset does, shard by shard: `<shard>.parquet` with one row per URL (url, key,
    status, error_message, ...) for every sample, and for successful ones only `<shard>/<key>.jpg` + `.json`
    (`files`) or the same members in `<shard>.tar` (`webdataset`), plus `<shard>_stats.json`. A failed
    download leaves nothing but its parquet row."""

    def __init__(self, root: Path, fmt: str, per_shard: int = 10_000) -> None:
        self.root, self.fmt, self.per_shard = root, fmt, per_shard
        self.samples: list[tuple[str, bytes | None]] = []

    def add(self, name: str, data: bytes | None) -> None:
        """`data` None = a failed download (status recorded in the parquet, no image)."""
        self.samples.append((name, data))

    def write(self) -> None:
        write_img2dataset(self.root, self.fmt, self.samples, self.per_shard)


def write_img2dataset(root: Path, fmt: str, samples: list[tuple[str, bytes | None]], per_shard: int = 10_000) -> int:
    """The img2dataset layout for `samples` (name, bytes or None); returns the number of failed rows."""
    root.mkdir(parents=True, exist_ok=True)
    failed = 0
    for shard_id, start in enumerate(range(0, len(samples), per_shard)):
        shard = f"{shard_id:05d}"
        rows: dict[str, list[object]] = {k: [] for k in ("url", "key", "status", "error_message", "width", "height")}
        with contextlib.ExitStack() as stack:
            tar = stack.enter_context(tarfile.open(root / f"{shard}.tar", "w")) if fmt == "webdataset" else None
            for i, (name, data) in enumerate(samples[start : start + per_shard]):
                key = f"{shard}{i:04d}"
                url = f"https://cdn.example.com/lpr4m/{name}.jpg"
                ok = data is not None
                failed += not ok
                for k, v in zip(
                    rows, (url, key, "success" if ok else "failed_to_download", None if ok else "HTTP Error 404"), strict=False
                ):
                    rows[k].append(v)
                rows["width"].append(48 if ok else None)
                rows["height"].append(48 if ok else None)
                if data is None:
                    continue
                meta = json.dumps({"url": url, "key": key, "status": "success", "error_message": None}).encode()
                for member, payload in ((f"{key}.jpg", data), (f"{key}.json", meta)):
                    if tar is not None:
                        info = tarfile.TarInfo(member)
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
                    else:
                        (root / shard).mkdir(exist_ok=True)
                        (root / shard / member).write_bytes(payload)
        pq.write_table(pa.table(rows), root / f"{shard}.parquet")
        statuses = rows["status"]
        (root / f"{shard}_stats.json").write_text(json.dumps({"count": len(statuses), "successes": statuses.count("success")}))
    return failed


def full_release(root: Path) -> tuple[Path, list[Path]]:
    """A tiny full release: 4 training products x 2 clips, two test livestreams whose galleries hold the
    same 3 pictures under different image ids, one clip per picture and livestream."""
    ann = root / "annotations"
    ann.mkdir(parents=True)
    train_frames, train_images = Img2Dataset(root / "train_frames", "files"), Img2Dataset(root / "train_images", "files")
    rows = []
    for p in range(4):
        train_images.add(f"{_iid(p)}-{1 if p == 3 else 0}", _jpeg(100 + p))  # product 3 was downloaded as view 1 only
        for c in range(2):
            clip = f"{TRAIN_LIVE}-{1000 * (2 * p + c)}-{1000 * (2 * p + c) + 900}"
            fids = [f"{clip}-{i:04d}" for i in range(3)]
            for i, f in enumerate(fids):
                failed = p == 0 and c == 0 and i == 2
                train_frames.add(f, None if failed else _jpeg(100 + p + 17 * (i + 1), (36, 64)))  # 9:16 frames
            boxes = [[[4, 8, 30, 50]] for _ in fids]
            cols = [clip, ",".join(fids), json.dumps(boxes), _iid(p), "title", "7", "cat", "asr", "large", "long", "single"]
            rows.append("\t".join(cols))
    rows.append(
        "\t".join([f"{TRAIN_LIVE}-99000-99900", f"{TRAIN_LIVE}-99000-99900-0000", "[]", _iid(50), *["x"] * 7])
    )  # nothing downloaded
    (ann / "training_videoinfo_full_part_01.txt").write_text("\n".join(rows) + "\n")

    test_frames, shop_images = Img2Dataset(root / "test_frames", "files"), Img2Dataset(root / "test_images", "webdataset")
    gt: dict[str, list[str]] = {}
    galleries: dict[str, list[str]] = {}
    frame_boxes: dict[str, list[list[int]]] = {}
    for live, base in ((LIVE_1, 10), (LIVE_2, 20)):
        galleries[live] = []
        for k in range(3):
            iid = _iid(base + k)
            shop_images.add(f"{iid}-0", _jpeg(k))  # the same picture in both livestreams
            shop_images.add(f"{iid}-1", _jpeg(500 + base + k))  # a second view: not in the official gallery
            galleries[live] += [f"{iid}-0.jpg", f"{iid}-1.jpg"]
            clip = f"{live}-{k * 5000}-{k * 5000 + 3000}"
            gt[clip] = [f"{iid}-0.jpg"]
            for i in range(2):
                test_frames.add(f"{clip}-{i:04d}", _jpeg(k))
                frame_boxes[f"{clip}-{i:04d}"] = [[1, 2, 40, 44]]
    lost = f"{LIVE_1}-90000-93000"  # a query whose frames all failed to download
    gt[lost] = [f"{_iid(10)}-0.jpg"]
    test_frames.add(f"{lost}-0000", None)
    frame_boxes[f"{lost}-0000"] = []
    for d in (train_frames, train_images, test_frames, shop_images):
        d.write()
    (ann / "test_videoid_to_gtimage_20079.json").write_text(json.dumps(gt))
    (ann / "test_liveid_to_gallery_110.json").write_text(json.dumps(galleries))
    (ann / "test_frameid2gtbox_20079_426751.json").write_text(json.dumps(frame_boxes))
    return ann, [root / "train_frames", root / "train_images", root / "test_frames", root / "test_images"]


def _convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, dict[str, object]]:
    ann, images = full_release(tmp_path / "dl")
    out = tmp_path / "lpr4m"
    argv = ["--annotations", str(ann), "--images", *map(str, images), "--out", str(out)]
    assert rice_main(["lpr4m", *argv]) == 0  # as users run it: `rice lpr4m ...`
    summary = json.loads(capsys.readouterr().out.split("\n}")[0] + "}")
    return out, summary


def test_full_release_converts_with_failed_downloads_counted_and_boxes_carried(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, summary = _convert(tmp_path, capsys)
    assert summary["layout"] == "full-release-img2dataset"
    assert summary["failed_downloads"] == 2  # one training frame, one test frame
    assert (summary["train_clips"], summary["train_clips_total"], summary["train_images_missing"]) == (8, 9, 1)
    assert summary["train_frames_missing"] == 2  # the failed one and the undownloaded clip's
    assert (summary["test_queries"], summary["test_queries_total"]) == (6, 7)
    assert (summary["gallery_images"], summary["gallery_images_total"]) == (6, 6)

    train_rows = [json.loads(x) for x in (out / "train-part-01.jsonl").read_text().splitlines()]
    first = train_rows[0]
    assert len(first["clip"]) == 2 and first["boxes"] == [[[4, 8, 30, 50]], [[4, 8, 30, 50]]]  # frame 3 failed
    assert first["sku"] == _iid(0) and first["shop"] == TRAIN_LIVE
    assert {r["sku"] for r in train_rows} == {_iid(p) for p in range(4)}
    image_meta = json.loads(Path(read_manifest(out / "train-part-01.jsonl")[6].image).with_suffix(".json").read_text())
    assert image_meta["url"].endswith(f"/{_iid(3)}-1.jpg")  # the only view that was downloaded

    gallery = read_manifest(out / "test_gallery.jsonl")
    assert sorted((g.shop, g.sku) for g in gallery) == sorted(
        (live, _iid(b + k)) for live, b in ((LIVE_1, 10), (LIVE_2, 20)) for k in range(3)
    )
    # Main views, read in place from the tar (nothing extracted): the bytes are the `-0` pictures.
    assert all(".tar#" in g.image for g in gallery) and not (out / "files").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.sqlite", "summary.json", "test_gallery.jsonl", "test_queries.jsonl", "test_queries.meta.json", "train-part-01.jsonl"]
    )
    pictures = {_decoded(_jpeg(k)) for k in range(3)}
    assert {read_image(g.image).tobytes() for g in gallery} == pictures
    queries = read_manifest(out / "test_queries.jsonl")
    assert {(q.shop, q.sku) for q in queries} == {(g.shop, g.sku) for g in gallery}
    assert all(len(q.clip) == 2 for q in queries)
    assert json.loads((out / "test_queries.jsonl").read_text().splitlines()[0])["boxes"] == [[[1, 2, 40, 44]]] * 2


def _evaluate(out: Path, per_shop: bool) -> dict[str, float]:
    p = argparse.ArgumentParser()
    evaluate.build_parser(p)
    argv = ["--queries", str(out / "test_queries.jsonl"), "--gallery", str(out / "test_gallery.jsonl"), "--workers", "0"]
    report_path = out / ("per_shop.json" if per_shop else "global.json")
    assert evaluate.run(p.parse_args([*argv, "--out", str(report_path)] + (["--per-shop"] if per_shop else []))) == 0
    recall: dict[str, float] = json.loads(report_path.read_text())["recall"]
    return recall


@pytest.mark.slow
def test_per_livestream_protocol_is_exact_where_a_global_gallery_cannot_be(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both livestreams' galleries hold the same pictures under different image ids, and each query
    shows its picture exactly: ranked against its own livestream it must hit at R@1; against the
    union, every query ties with its twin in the other livestream, and one of each pair must miss."""
    out, _ = _convert(tmp_path, capsys)
    assert _evaluate(out, per_shop=True)["R@1"] == 1.0
    assert _evaluate(out, per_shop=False)["R@1"] <= 0.5


@pytest.mark.slow
def test_converted_training_manifest_trains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = _convert(tmp_path, capsys)
    p = argparse.ArgumentParser()
    train.build_parser(p)
    argv = "--backbone vit --vit 32,2,4,8,32,16 --decoder-width 32 --decoder-heads 4 --frames 3 --batch-size 4 --max-steps 2 \
        --warmup 1 --workers 0 --no-progress --log-every 1"
    args = p.parse_args(["--train", str(out / "train-part-*.jsonl"), "--out", str(tmp_path / "run"), *argv.split()])
    assert train.run(args) == 0
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)


def _subset(root: Path) -> tuple[Path, str]:
    """A tiny LPR750K: one training clip (3 frames listed, 2 on disk), one val clip, one query clip, a gallery
    whose second image id is listed bare (no `-k.jpg`) and exists only as `<id>-0.jpg`/`<id>-1.jpg`."""
    clip, val_clip = f"{LIVE_1}-1000-9000", f"{LIVE_2}-1000-9000"
    for sub, name, seed in (
        ("training_video_01/" + clip, f"{clip}-0001.jpg", 1),
        ("training_video_01/" + clip, f"{clip}-0002.jpg", 2),
        ("training_video_02/" + val_clip, f"{val_clip}-0001.jpg", 8),
        ("training_image", "img7.jpg", 3),
        ("query/" + clip, f"{clip}-0001.jpg", 4),
        (f"gallery/{LIVE_1}", f"{_iid(1)}-0.jpg", 5),
        (f"gallery/{LIVE_1}", f"{_iid(1)}-1.jpg", 6),
        (f"gallery/{LIVE_1}", f"{_iid(2)}-0.jpg", 7),
        (f"gallery/{LIVE_1}", f"{_iid(2)}-1.jpg", 9),
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / name).write_bytes(_jpeg(seed))
    frames = [f"training_video_01/{clip}/{clip}-000{i}.jpg" for i in (1, 2, 3)]  # the third is missing
    row = [clip, repr(frames), "[[0, 0, 9, 9]]", "img7", "training_image/img7.jpg", "t", "3", "c", "spu9", "asr"]
    val_row = [val_clip, repr([f"training_video_02/{val_clip}/{val_clip}-0001.jpg"]), "[]", "img7", "training_image/img7.jpg"]
    val_row += ["t", "3", "c", "spu7", "asr"]
    ann = root / "annotations"
    ann.mkdir()
    (ann / "training_videoinfo_750k.txt").write_text("\t".join(row) + "\n")
    (ann / "training_videoinfo_val.txt").write_text("\t".join(val_row) + "\n")  # must not enter training
    (ann / "test_videoid_to_gtimage_20079.json").write_text(json.dumps({clip: [f"{_iid(1)}-1.jpg"]}))
    (ann / "test_liveid_to_gallery_110.json").write_text(json.dumps({LIVE_1: [f"{_iid(1)}-0.jpg", f"{_iid(1)}-1.jpg", _iid(2)]}))
    return ann, clip


def test_750k_subset_layout_is_detected_and_converted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "LPR750K"
    ann, clip = _subset(root)
    out = tmp_path / "out"
    assert lpr4m.main(["--annotations", str(ann), "--images", str(root), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.split("\n}")[0] + "}")
    assert summary["layout"] == "lpr750k-subset" and summary["train_frames_missing"] == 1
    (t,) = read_manifest(out / "train-part-00.jsonl")  # the val file's clip is not in training
    assert t.sku == "spu9" and t.shop == LIVE_1 and len(t.clip) == 2
    (v,) = read_manifest(out / "val.jsonl")
    assert v.sku == "spu7"
    gallery = read_manifest(out / "test_gallery.jsonl")
    # The bare id resolves to its `-0` view: not dropped.
    assert [(Path(g.image).name, g.sku) for g in gallery] == [(f"{_iid(1)}-0.jpg", _iid(1)), (f"{_iid(2)}-0.jpg", _iid(2))]
    (q,) = read_manifest(out / "test_queries.jsonl")
    assert q.sku == _iid(1) and q.shop == LIVE_1 and q.clip == (str(root / "query" / clip / f"{clip}-0001.jpg"),)
    assert json.loads((out / "test_queries.meta.json").read_text())["ground_truth_queries"] == 1


def test_750k_authors_test_lists_are_used_when_present(tmp_path: Path) -> None:
    """gallery_main.txt (`<live>/<image>` per line) and query_tenframes.json ({clip: {frames, gt}}) as the
    authors' dataset reads them; --train-file picks the training split by name."""
    root = tmp_path / "LPR750K"
    ann, clip = _subset(root)
    (ann / "gallery_main.txt").write_text(f"{LIVE_1}/{_iid(2)}-1.jpg\n")  # only this view of image 2
    (ann / "query_tenframes.json").write_text(json.dumps({clip: {"frames": [f"{clip}/{clip}-0001.jpg"], "gt": [f"{_iid(2)}-1.jpg"]}}))
    (ann / "training_videoinfo_641821.txt").write_text("")
    out = tmp_path / "out"
    counts = lpr4m.convert(ann, [root], out, train_file="training_videoinfo_641821.txt")
    assert counts.train_clips == 0 and counts.val_clips == 1  # the named (empty) split, not the 750k file
    (g,) = read_manifest(out / "test_gallery.jsonl")
    assert Path(g.image).name == f"{_iid(2)}-1.jpg" and g.sku == _iid(2)
    (q,) = read_manifest(out / "test_queries.jsonl")
    assert q.sku == _iid(2)


def test_failed_count_equals_the_parquets_and_frames_kept_are_the_samplers(tmp_path: Path) -> None:
    """Several shards, 1 in 5 samples failed; a 30-frame clip keeps the 10 frames linspace picks."""
    ann = tmp_path / "annotations"
    ann.mkdir()
    clip = f"{TRAIN_LIVE}-0-30000"
    fids = [f"{clip}-{i:04d}" for i in range(30)]
    samples: list[tuple[str, bytes | None]] = [(f, None if i % 5 == 4 else _jpeg(i)) for i, f in enumerate(fids)]
    failed = write_img2dataset(tmp_path / "frames", "webdataset", samples, per_shard=7)
    write_img2dataset(tmp_path / "images", "files", [(f"{_iid(0)}-0", _jpeg(99))])
    (ann / "training_videoinfo_full_part_03.txt").write_text("\t".join([clip, json.dumps(fids), "[]", _iid(0), *["x"] * 7]) + "\n")
    parquet_failed = sum(
        s != "success" for f in sorted((tmp_path / "frames").glob("*.parquet")) for s in pq.read_table(f)["status"].to_pylist()
    )
    counts = lpr4m.convert(ann, [tmp_path / "frames", tmp_path / "images"], tmp_path / "out")
    assert counts.failed_downloads == parquet_failed == failed == 6 and counts.failed_by_folder["frames"] == 6
    (row,) = [json.loads(x) for x in (tmp_path / "out" / "train-part-03.jsonl").read_text().splitlines()]
    downloaded = [f for i, f in enumerate(fids) if i % 5 != 4]
    want = [downloaded[i] for i in np.linspace(0, len(downloaded) - 1, 10).round().astype(int)]
    got = [read_image(str(tmp_path / "out" / ref)).tobytes() for ref in row["clip"]]
    assert got == [_decoded(_jpeg(fids.index(f))) for f in want]
    assert row["conditions"] == {"scale": "x", "duration": "x", "number": "x"}
    assert not any(p.is_dir() for p in (tmp_path / "out").iterdir())  # no extracted frame folder


def test_a_rerun_skips_indexed_shards_and_finished_parts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, first = _convert(tmp_path, capsys)
    before = {p.name: p.read_bytes() for p in out.glob("*.jsonl")}
    ann, images = (
        tmp_path / "dl" / "annotations",
        [tmp_path / "dl" / d for d in ("train_frames", "train_images", "test_frames", "test_images")],
    )
    again = lpr4m.convert(ann, images, out)
    assert again.shards_indexed_now == 0 and again.train_parts_skipped == 1
    assert (again.train_clips, again.failed_downloads) == (first["train_clips"], first["failed_downloads"])
    assert {p.name: p.read_bytes() for p in out.glob("*.jsonl")} == before


@pytest.mark.slow
def test_recall_both_ways_and_per_condition(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """7 ground-truth queries, 6 evaluable (one lost all its frames): R@1 is 1 over the 6 with a gallery match
    (ours) and 6/7 over all ground truth (the authors'); a --conditional list is reported the same two ways."""
    out, _ = _convert(tmp_path, capsys)
    (t, *_) = read_manifest(out / "train-part-01.jsonl")
    assert dict(t.conditions) == {"scale": "large", "duration": "long", "number": "single"}  # columns [9]-[11]
    queries = read_manifest(out / "test_queries.jsonl")
    lost = f"{LIVE_1}-90000-93000"
    cond = tmp_path / "long_clips.txt"
    cond.write_text("\n".join([str(queries[0].id), str(queries[1].id), lost]) + "\n")
    p = argparse.ArgumentParser()
    evaluate.build_parser(p)
    argv = ["--queries", str(out / "test_queries.jsonl"), "--gallery", str(out / "test_gallery.jsonl"), "--per-shop", "--workers", "0"]
    assert evaluate.run(p.parse_args([*argv, "--conditional", str(cond)])) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["recall"]["R@1"] == 1.0 and report["recall_basis"].startswith("6 queries")
    assert report["recall_all_ground_truth"]["R@1"] == round(6 / 7, 4)
    c = report["conditional"]["long_clips"]
    assert (c["queries"], c["ground_truth_queries"], c["recall"]["R@1"], c["recall_all_ground_truth"]["R@1"]) == (
        2,
        3,
        1.0,
        round(2 / 3, 4),
    )
