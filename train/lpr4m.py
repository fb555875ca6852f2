"""Convert an LPR4M download into the project's manifests, streaming: memory does not grow with the release.

    rice lpr4m --annotations DIR --images DIR [DIR ...] --out DIR
    python -m train.lpr4m --annotations DIR --images DIR [DIR ...] --out DIR

Writes OUT/train-part-XX.jsonl (one per annotation part; `rice train --train 'OUT/train-part-*.jsonl'`),
OUT/test_queries.jsonl (+ test_queries.meta.json: every ground-truth clip id, for R@k over all of
them as the authors divide), OUT/test_gallery.jsonl (`rice evaluate --per-shop`: SKU = the shop image
id, shop = the livestream id, so each query is ranked only against its own livestream's gallery), and
OUT/summary.json. Rows carry the clip id ("id"), the product boxes of the kept frames ("boxes") and,
for training, the category and the diversity columns ("conditions": scale, duration, number).

Frames kept: `--frames N` (default 10) per clip, chosen as the samplers choose them (`linspace` over
the clip's downloaded frames). `rice evaluate` then sees exactly its 10 evaluation frames, and
`rice train --frames N` (with cut-tail) exactly the frames it would sample from the whole clip; with
fewer training frames it samples among the N kept. `--frames 0` keeps every frame.

Two layouts, told apart automatically:
- The public full release (adxcreative/RICE): four URL lists downloaded with img2dataset, either
  `--output_format files` or `webdataset`. --images are its output folders. Shards are walked in order
  and indexed into OUT/index.sqlite (`train.img2dataset`): status from each shard's parquet (a failed
  download has only its parquet row), images by `<shard>/<key>.jpg` or by byte offset inside
  `<shard>.tar`: tars are read in place, nothing is extracted. --annotations holds
  `training_videoinfo_full_part_XX.txt` (11 tab-separated columns: video_id, frame ids, boxes,
  image_id, title, category id, category name, ASR, scale, visible duration, product number) and the
  test JSONs (`test_videoid_to_gtimage_*.json`, `test_liveid_to_gallery_*.json`, `test_frameid2gtbox_*.json`).
- The authors' 750K subset (LPR750K) unpacked: an --images folder with query/, gallery/,
  training_image/, training_video_0X/; annotations `training_videoinfo_750k.txt` (--train-file),
  `training_videoinfo_val.txt` (--val-file, written as OUT/val.jsonl), and for the test
  `query_tenframes.json` / `gallery_main.txt` when present (else the two test JSONs).

Resumable: indexed shards and finished training parts are skipped on a re-run (delete OUT to start
over). The summary counts failed downloads per --images folder (from the parquets) and what was kept.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model.preprocess import IMAGE_SUFFIXES, sample_indices
from train.data import lpr4m_image_id, lpr4m_live_id, lpr4m_main_views, lpr4m_view_rank
from train.img2dataset import DownloadIndex

SUBSET_MARKERS = ("query", "gallery", "training_image")
CONDITIONS = ("scale", "duration", "number")  # full-release columns [9]-[11] (1-based)


@dataclass
class Counts:
    """What the conversion kept and skipped (printed and written to OUT/summary.json)."""

    layout: str = ""
    failed_downloads: int = 0  # img2dataset rows whose status is not "success" (from the parquets)
    failed_by_folder: dict[str, int] = field(default_factory=dict)
    downloads_absent: int = 0  # status "success" but no image on disk
    shards_indexed: int = 0
    shards_indexed_now: int = 0
    train_parts: int = 0
    train_parts_skipped: int = 0  # finished by an earlier run
    train_clips: int = 0
    train_clips_total: int = 0
    train_frames_missing: int = 0
    train_frames_kept: int = 0
    train_images_missing: int = 0
    val_clips: int = 0
    test_queries: int = 0
    test_queries_total: int = 0
    test_frames_missing: int = 0
    test_queries_without_gallery_truth: int = 0
    gallery_images: int = 0
    gallery_images_total: int = 0


# --- parsing helpers -----------------------------------------------------------------------------


def parse_list(text: str) -> Any:
    """A list-valued annotation column: JSON or a Python literal, else comma/semicolon/space separated."""
    t = text.strip()
    if not t:
        return []
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(t)
        except (ValueError, SyntaxError):
            continue
    return [x for x in re.split(r"[,;|\s]+", t) if x]


def frame_ids(text: str) -> list[str]:
    """The frame-id column -> frame ids (file stems), in order."""
    value = parse_list(text)
    items = value if isinstance(value, list) else [value]
    return [Path(str(x)).stem for x in items if str(x).strip()]


def clip_of_frame(frame_id: str) -> str:
    """`<clip_id>-<4-digit index>` -> clip_id."""
    return frame_id.rsplit("-", 1)[0]


def keep_frames(n: int, frames: int) -> list[int]:
    """Indices (of n available frames, in order) the samplers would use: linspace to `frames`; all when 0."""
    return list(range(n)) if frames <= 0 else sample_indices(n, frames)


def _find(annotations: Path, pattern: str) -> list[Path]:
    return sorted(annotations.rglob(pattern))


def _load_json(annotations: Path, pattern: str) -> Any:
    found = _find(annotations, pattern)
    return json.loads(found[0].read_text()) if found else None


def _lines(path: Path) -> Iterator[list[str]]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            cols = line.rstrip("\r\n").split("\t")
            if len(cols) >= 4 and cols[0].strip():
                yield cols


class _Writer:
    """A manifest written to a temp file and renamed when complete (a crash never leaves half a part)."""

    def __init__(self, path: Path) -> None:
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.f = self.tmp.open("w", encoding="utf-8")
        self.rows = 0

    def write(self, row: dict[str, Any]) -> None:
        self.f.write(json.dumps({k: v for k, v in row.items() if v not in (None, [], (), {})}, ensure_ascii=False) + "\n")
        self.rows += 1

    def close(self) -> None:
        self.f.close()
        self.tmp.replace(self.path)


def _meta(path: Path, gt_ids: Sequence[str]) -> None:
    """Every ground-truth query id beside the query manifest: `rice evaluate` divides R@k by all of them too."""
    path.with_name(path.stem + ".meta.json").write_text(json.dumps({"ground_truth_queries": len(gt_ids), "ids": list(gt_ids)}))


# --- the full release ----------------------------------------------------------------------------


def _image_ref(index: DownloadIndex, listed: str) -> str | None:
    """An annotated shop image (`<image_id>` or `<image_id>-<k>[.jpg]`): the listed view when downloaded,
    else the image id's main downloaded view (a bare id resolves to `<id>-0`, then the other views)."""
    stem = Path(listed).stem if Path(listed).suffix.lower() in IMAGE_SUFFIXES else listed
    ref = index.get(stem)
    if ref is not None:
        return ref
    views = index.views(lpr4m_image_id(stem))
    return views[min(views, key=lpr4m_view_rank)] if views else None


def _train_part(index: DownloadIndex, txt: Path, out: _Writer, frames: int, counts: dict[str, int]) -> None:
    """One annotation part -> one manifest, a row at a time."""
    for cols in _lines(txt):
        counts["train_clips_total"] += 1
        video_id, fids, image_id = cols[0].strip(), frame_ids(cols[1]), cols[3].strip()
        have: dict[str, str] = {}
        for clip in dict.fromkeys(clip_of_frame(f) for f in fids):
            have.update(index.frames(clip))
        avail = [i for i, f in enumerate(fids) if f in have]
        counts["train_frames_missing"] += len(fids) - len(avail)
        image = _image_ref(index, image_id)
        counts["train_images_missing"] += image is None
        if not avail or image is None:
            continue
        chosen = [avail[j] for j in keep_frames(len(avail), frames)]
        boxes = parse_list(cols[2]) if len(cols) > 2 else []
        row: dict[str, Any] = {"id": video_id, "clip": [have[fids[i]] for i in chosen], "image": image}
        row.update(sku=lpr4m_image_id(image_id), shop=lpr4m_live_id(video_id))
        if isinstance(boxes, list) and len(boxes) == len(fids):
            row["boxes"] = [boxes[i] for i in chosen]
        if len(cols) > 5:
            row["category"] = cols[5].strip()
        if len(cols) >= 11:
            row["conditions"] = {k: cols[8 + i].strip() for i, k in enumerate(CONDITIONS)}
        out.write(row)
        counts["train_clips"] += 1
        counts["train_frames_kept"] += len(chosen)


def _part_name(txt: Path, i: int) -> str:
    m = re.search(r"part_?(\d+)", txt.stem)
    return f"train-part-{int(m.group(1)) if m else i:02d}.jsonl"


def convert_full(annotations: Path, roots: Sequence[Path], out_dir: Path, counts: Counts, frames: int) -> None:
    """img2dataset downloads + full-release annotations -> the manifests, shard by shard and part by part."""
    index = DownloadIndex(out_dir / "index.sqlite")
    try:
        counts.shards_indexed_now = index.build(roots)
        for root, s in index.failed_by_root().items():
            counts.failed_by_folder[Path(root).name] = s["failed"]
            counts.failed_downloads += s["failed"]
            counts.downloads_absent += s["missing"]
            counts.shards_indexed += s["shards"]
        index.relative_to(out_dir)
        index.db.execute("CREATE TABLE IF NOT EXISTS parts(name TEXT PRIMARY KEY, counts TEXT)")
        parts = _find(annotations, "training_videoinfo_full_part_*.txt") or _find(annotations, "training_videoinfo_*.txt")
        for i, txt in enumerate(parts):
            name = _part_name(txt, i)
            done = index.db.execute("SELECT counts FROM parts WHERE name = ?", (name,)).fetchone()
            if done is not None and (out_dir / name).is_file():
                part_counts = json.loads(done[0])
                counts.train_parts_skipped += 1
            else:
                part_counts = dict.fromkeys(("train_clips", "train_clips_total", "train_frames_missing", "train_frames_kept"), 0)
                part_counts["train_images_missing"] = 0
                w = _Writer(out_dir / name)
                _train_part(index, txt, w, frames, part_counts)
                w.close()
                with index.db:
                    index.db.execute("INSERT OR REPLACE INTO parts VALUES (?, ?)", (name, json.dumps(part_counts)))
            counts.train_parts += 1
            for k, v in part_counts.items():
                setattr(counts, k, getattr(counts, k) + v)
        _test_full(annotations, index, out_dir, counts, frames)
    finally:
        index.close()


def _test_full(annotations: Path, index: DownloadIndex, out_dir: Path, counts: Counts, frames: int) -> None:
    gt: dict[str, Any] = _load_json(annotations, "test_videoid_to_gtimage*.json") or {}
    galleries: dict[str, list[str]] = _load_json(annotations, "test_liveid_to_gallery*.json") or {}
    frame_boxes: dict[str, Any] = {Path(k).stem: v for k, v in (_load_json(annotations, "test_frameid2gtbox*.json") or {}).items()}
    listed: dict[str, set[str]] = {}
    for fid in frame_boxes:
        listed.setdefault(clip_of_frame(fid), set()).add(fid)
    gallery = _Writer(out_dir / "test_gallery.jsonl")
    where: dict[tuple[str, str], str] = {}
    for live, names in galleries.items():
        for iid, name in lpr4m_main_views(names).items():
            counts.gallery_images_total += 1
            ref = _image_ref(index, name)
            if ref is not None:
                where[(live, iid)] = ref
                gallery.write({"image": ref, "sku": iid, "shop": live})
    gallery.close()
    counts.gallery_images = gallery.rows
    queries = _Writer(out_dir / "test_queries.jsonl")
    for clip_id, images in gt.items():
        counts.test_queries_total += 1
        live = lpr4m_live_id(clip_id)
        have = index.frames(clip_id)  # sorted by frame id = by time
        counts.test_frames_missing += len(listed.get(clip_id, set()) - have.keys())
        truth = [i for i in lpr4m_main_views(images if isinstance(images, list) else [images]) if (live, i) in where]
        counts.test_queries_without_gallery_truth += not truth
        if not have or not truth:
            continue
        fids = list(have)
        kept = [fids[j] for j in keep_frames(len(fids), frames)]
        row: dict[str, Any] = {"id": clip_id, "clip": [have[f] for f in kept], "image": where[(live, truth[0])], "sku": truth[0]}
        row.update(shop=live, also=truth[1:])
        if frame_boxes:
            row["boxes"] = [frame_boxes.get(f) for f in kept]
        queries.write(row)
    queries.close()
    counts.test_queries = queries.rows
    _meta(out_dir / "test_queries.jsonl", list(gt))


# --- the 750K subset -----------------------------------------------------------------------------


def _subset_root(roots: Sequence[Path]) -> Path | None:
    for root in roots:
        if any((root / m).is_dir() for m in SUBSET_MARKERS) or any(root.glob("training_video_*")):
            return root
    return None


def _rel(out_dir: Path, p: Path) -> str:
    q, top = p.resolve(), out_dir.resolve()
    return str(q.relative_to(top)) if q.is_relative_to(top) else str(q)


def _subset_rows(root: Path, txt: Path, out: _Writer, out_dir: Path, frames: int, counts: Counts) -> int:
    """LPR750K training rows (0-based: [0] video_id, [1] frame paths, [2] boxes, [3] image_id, [4] image
    path, [6] category id, [8] SPU id): SKU = the SPU id, shop = the livestream."""
    n = 0
    for cols in _lines(txt):
        counts.train_clips_total += 1
        paths = parse_list(cols[1])
        paths = paths if isinstance(paths, list) else [paths]
        have = [i for i, p in enumerate(paths) if (root / str(p)).is_file()]
        counts.train_frames_missing += len(paths) - len(have)
        image = root / cols[4] if len(cols) > 4 else None
        if image is None or not image.is_file():
            counts.train_images_missing += 1
            continue
        if not have or len(cols) < 9:
            continue
        chosen = [have[j] for j in keep_frames(len(have), frames)]
        boxes = parse_list(cols[2])
        row: dict[str, Any] = {"id": cols[0], "clip": [_rel(out_dir, root / str(paths[i])) for i in chosen], "image": _rel(out_dir, image)}
        row.update(sku=cols[8].strip(), shop=lpr4m_live_id(cols[0]), category=cols[6].strip())
        if isinstance(boxes, list) and boxes:
            row["boxes"] = [boxes[i] for i in chosen] if len(boxes) == len(paths) else boxes
        out.write(row)
        counts.train_frames_kept += len(chosen)
        n += 1
    return n


def _gallery_file(root: Path, live: str, listed: str) -> Path | None:
    """A gallery entry -> its file: as listed, under gallery/<live>/, a bare id as `<id>.jpg` / `<id>-0.jpg`
    or else its lowest-numbered view."""
    folder = root / "gallery" / live
    name = Path(listed).name
    for cand in (root / listed, root / "gallery" / listed, folder / name, folder / f"{name}.jpg", folder / f"{name}-0.jpg"):
        if cand.is_file():
            return cand
    iid = lpr4m_image_id(name)
    views = sorted(folder.glob(f"{iid}-*"), key=lambda p: lpr4m_view_rank(p.name)) if folder.is_dir() else []
    views = [v for v in views if v.suffix.lower() in IMAGE_SUFFIXES and lpr4m_image_id(v.name) == iid]
    return views[0] if views else None


def _subset_test(root: Path, ann: Path, out_dir: Path, counts: Counts, frames: int) -> None:
    main_txt = _find(ann, "gallery_main.txt")
    entries: list[tuple[str, str]] = []
    if main_txt:  # "<live_id>/<image name>" per line: the main views the authors evaluate against
        entries = [tuple(line.strip().split("/", 1)) for line in main_txt[0].read_text().splitlines() if "/" in line]  # type: ignore[misc]
    else:
        galleries: dict[str, list[str]] = _load_json(ann, "test_liveid_to_gallery*.json") or {}
        entries = [(live, name) for live, names in galleries.items() for name in lpr4m_main_views(names).values()]
    gallery = _Writer(out_dir / "test_gallery.jsonl")
    where: dict[tuple[str, str], str] = {}
    for live, name in entries:
        counts.gallery_images_total += 1
        f = _gallery_file(root, live, name)
        if f is not None:
            where[(live, lpr4m_image_id(name))] = _rel(out_dir, f)
            gallery.write({"image": where[(live, lpr4m_image_id(name))], "sku": lpr4m_image_id(name), "shop": live})
    gallery.close()
    counts.gallery_images = gallery.rows
    tenframes = _load_json(ann, "query_tenframes.json")
    if tenframes is not None:  # {clip: {"frames": [...], "gt": [...]}}
        queries = {clip: (v.get("frames", []), v.get("gt", [])) for clip, v in tenframes.items()}
    else:
        gt: dict[str, Any] = _load_json(ann, "test_videoid_to_gtimage*.json") or {}
        queries = {}
        for clip, images in gt.items():
            folder = root / "query" / clip
            names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
            queries[clip] = ([f"{clip}/{n}" for n in names], images if isinstance(images, list) else [images])
    w = _Writer(out_dir / "test_queries.jsonl")
    for clip, (paths, images) in queries.items():
        counts.test_queries_total += 1
        live = lpr4m_live_id(clip)
        found = (next((c for c in (root / "query" / p, root / p) if c.is_file()), None) for p in paths)
        files = list(dict.fromkeys(f for f in found if f is not None))
        counts.test_frames_missing += len(paths) - len(files)
        truth = [i for i in lpr4m_main_views(images) if (live, i) in where]
        counts.test_queries_without_gallery_truth += not truth
        if not files or not truth:
            continue
        kept = [_rel(out_dir, files[j]) for j in keep_frames(len(files), frames)]
        w.write({"id": clip, "clip": kept, "image": where[(live, truth[0])], "sku": truth[0], "shop": live, "also": truth[1:]})
    w.close()
    counts.test_queries = w.rows
    _meta(out_dir / "test_queries.jsonl", list(queries))


def convert_subset(ann: Path, root: Path, out_dir: Path, counts: Counts, frames: int, train_file: str | None, val_file: str) -> None:
    """The unpacked LPR750K layout -> the manifests."""
    named = _find(ann, train_file) if train_file else []
    if train_file and not named and train_file != DEFAULT_TRAIN_FILE:
        raise FileNotFoundError(f"--train-file {train_file} not found under {ann}")
    if not named:  # the README's name, else every training file that is not a validation split
        named = _find(ann, DEFAULT_TRAIN_FILE) or [p for p in _find(ann, "training_videoinfo_*.txt") if "val" not in p.stem]
    w = _Writer(out_dir / "train-part-00.jsonl")
    for txt in named:
        counts.train_clips += _subset_rows(root, txt, w, out_dir, frames, counts)
    w.close()
    counts.train_parts = 1
    val = _find(ann, val_file)
    if val:
        vw = _Writer(out_dir / "val.jsonl")
        scratch = Counts()
        counts.val_clips = _subset_rows(root, val[0], vw, out_dir, frames, scratch)
        vw.close()
    if _find(ann, "query_tenframes.json") or _find(ann, "test_videoid_to_gtimage*.json"):
        _subset_test(root, ann, out_dir, counts, frames)


# --- command line --------------------------------------------------------------------------------

DEFAULT_TRAIN_FILE = "training_videoinfo_750k.txt"
DEFAULT_VAL_FILE = "training_videoinfo_val.txt"


def convert(
    annotations: str | os.PathLike[str],
    images: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    frames: int = 10,
    train_file: str | None = None,
    val_file: str = DEFAULT_VAL_FILE,
) -> Counts:
    """Write the manifests into `out`; returns the counts."""
    ann, roots, out_dir = Path(annotations), [Path(p) for p in images], Path(out)
    for p in [ann, *roots]:
        if not p.is_dir():
            raise FileNotFoundError(f"not a folder: {p}")
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = Counts()
    subset = _subset_root(roots)
    if subset is not None:
        counts.layout = "lpr750k-subset"
        convert_subset(ann, subset, out_dir, counts, frames, train_file, val_file)
    else:
        counts.layout = "full-release-img2dataset"
        convert_full(ann, roots, out_dir, counts, frames)
    (out_dir / "summary.json").write_text(json.dumps(asdict(counts), indent=2) + "\n")
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `rice lpr4m` / `python -m train.lpr4m`."""
    parser.add_argument("--annotations", required=True, help="folder with the LPR4M annotation files (searched recursively)")
    parser.add_argument(
        "--images",
        required=True,
        nargs="+",
        help="img2dataset output folders (files or webdataset tars, with their parquets), or the unpacked LPR750K folder",
    )
    parser.add_argument("--out", required=True, help="where the manifests, summary.json and the download index go")
    parser.add_argument(
        "--frames",
        type=int,
        default=10,
        help="frames kept per clip, chosen as the samplers choose them (linspace over the downloaded frames): "
        "`rice evaluate` uses 10, and `rice train --frames N` sees the same frames as from the whole clip when N equals "
        "this (default 10; 0 keeps every frame)",
    )
    parser.add_argument(
        "--train-file", help=f"LPR750K training annotations (default {DEFAULT_TRAIN_FILE}, else training_videoinfo_*.txt without 'val')"
    )
    parser.add_argument("--val-file", default=DEFAULT_VAL_FILE, help="LPR750K validation annotations, written to OUT/val.jsonl if present")


def run(args: argparse.Namespace) -> int:
    """Convert and print a summary; 1 when nothing usable was found."""
    counts = convert(args.annotations, args.images, args.out, args.frames, args.train_file, args.val_file)
    sys.stdout.write(json.dumps(asdict(counts), indent=2) + "\n")
    sys.stdout.write(
        f"{counts.layout}: {counts.train_clips}/{counts.train_clips_total} training clips usable "
        f"({counts.train_parts} parts), {counts.test_queries}/{counts.test_queries_total} test queries, "
        f"{counts.gallery_images}/{counts.gallery_images_total} gallery images; "
        f"{counts.failed_downloads} failed downloads (parquet status) skipped\n"
    )
    return 0 if counts.train_clips or counts.test_queries else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
