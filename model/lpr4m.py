"""Convert an LPR4M download into the project's manifests.

    rice lpr4m --annotations DIR --images DIR [DIR ...] --out DIR
    python -m model.lpr4m --annotations DIR --images DIR [DIR ...] --out DIR

Writes OUT/train.jsonl, OUT/test_queries.jsonl and OUT/test_gallery.jsonl, which `rice train` and
`rice evaluate --per-shop` read as they are (SKU = the shop image id, shop = the livestream id, so
each query is ranked only against its own livestream's gallery, as in the official protocol).
Rows also carry the annotations' product boxes ("boxes", one entry per kept frame).

Two layouts, told apart automatically:
- The public full release (adxcreative/RICE): four URL lists downloaded with img2dataset.
  --images are its output folders, `--output_format files` (`<shard>/<key>.jpg` + `<key>.json` whose
  "url" ends in `<frame_id>.jpg` or `<image_id>[-<k>].jpg`) or `webdataset` (`<shard>.tar` holding the
  same members; the images used are extracted to OUT/files/). --annotations holds
  `training_videoinfo_full_part_XX.txt` (11 tab-separated columns: video_id, frame ids, boxes,
  image_id, title, category id, category name, ASR, scale, visible duration, product number) and the
  test JSONs (`test_videoid_to_gtimage_*.json`, `test_liveid_to_gallery_*.json`,
  `test_frameid2gtbox_*.json`).
- The authors' 750K subset (LPR750K) unpacked: an --images folder with query/, gallery/,
  training_image/, training_video_0X/ (read by `model.data.read_lpr4m`).

Downloads fail (img2dataset status != "success", or a file that is simply absent): such frames and
images are skipped and counted, clips keep the frames that exist, and a clip, query or gallery image
with nothing left is dropped. The summary says how many clips and images were usable.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from model.data import (
    frame_files,
    lpr4m_image_id,
    lpr4m_live_id,
    lpr4m_main_views,
    lpr4m_view_rank,
    read_lpr4m,
)
from model.preprocess import IMAGE_SUFFIXES

SUBSET_MARKERS = ("query", "gallery", "training_image")


@dataclass
class Counts:
    """What the conversion kept and skipped (printed as JSON at the end)."""

    layout: str = ""
    failed_downloads: int = 0  # img2dataset samples whose status is not "success"
    train_clips: int = 0
    train_clips_total: int = 0
    train_frames_missing: int = 0
    train_images_missing: int = 0
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


def _url_name(url: str) -> str:
    return Path(urlparse(url).path).stem


# --- the downloaded files ------------------------------------------------------------------------


class DownloadIndex:
    """name (the URL's file stem: a frame id, or an image id with its optional view suffix) -> local file.

    Files come from img2dataset `files` folders directly; members of webdataset tars are extracted
    to `extract_dir` on demand (`materialise`), so only the images the annotations use are written.
    """

    def __init__(self, roots: Sequence[Path], extract_dir: Path) -> None:
        self.files: dict[str, Path] = {}
        self.tar_members: dict[str, tuple[Path, str]] = {}
        self.failed = 0
        self.extract_dir = extract_dir
        for root in roots:
            for dirpath, _, names in os.walk(root):
                self._scan_folder(Path(dirpath), names)
        self.views: dict[str, list[str]] = {}
        for name in [*self.files, *self.tar_members]:
            self.views.setdefault(lpr4m_image_id(name), []).append(name)

    def _scan_folder(self, folder: Path, names: list[str]) -> None:
        present = set(names)
        for name in names:
            path = folder / name
            if name.endswith(".tar"):
                self._scan_tar(path)
            elif name.endswith(".json") and not name.endswith("_stats.json"):
                meta = self._read_meta(path.read_text())
                if meta is None:
                    continue
                url, ok = meta
                image = next((f"{Path(name).stem}{s}" for s in IMAGE_SUFFIXES if f"{Path(name).stem}{s}" in present), None)
                if ok and image is not None:
                    self.files[_url_name(url)] = folder / image
                elif not ok:
                    self.failed += 1

    def _read_meta(self, text: str) -> tuple[str, bool] | None:
        try:
            meta = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(meta, dict) or not meta.get("url"):
            return None
        return str(meta["url"]), meta.get("status", "success") == "success"

    def _scan_tar(self, path: Path) -> None:
        images: dict[str, str] = {}
        metas: dict[str, tuple[str, bool]] = {}
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                suffix = Path(member.name).suffix
                key = member.name[: len(member.name) - len(suffix)]
                if suffix.lower() in IMAGE_SUFFIXES:
                    images[key] = member.name
                elif suffix == ".json":
                    f = tar.extractfile(member)
                    meta = self._read_meta(f.read().decode("utf-8", "replace")) if f is not None else None
                    if meta is not None:
                        metas[key] = meta
        for key, (url, ok) in metas.items():
            if ok and key in images:
                self.tar_members[_url_name(url)] = (path, images[key])
            elif not ok:
                self.failed += 1

    def materialise(self, names: Iterable[str]) -> None:
        """Extract the tar members among `names` (grouped by tar, each archive read once)."""
        by_tar: dict[Path, dict[str, str]] = {}
        for name in names:
            if name in self.tar_members and name not in self.files:
                tar_path, member_name = self.tar_members[name]
                by_tar.setdefault(tar_path, {})[member_name] = name
        for tar_path, wanted in by_tar.items():
            with tarfile.open(tar_path) as tar:
                for info in tar:
                    target = wanted.get(info.name)
                    f = tar.extractfile(info) if target is not None else None
                    if target is None or f is None:
                        continue
                    name = target
                    out = self.extract_dir / f"{name}{Path(info.name).suffix.lower()}"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(f.read())
                    self.files[name] = out

    def has(self, name: str) -> bool:
        return name in self.files or name in self.tar_members

    def image_name(self, listed: str) -> str | None:
        """The downloaded file name for an annotated image (`<image_id>` or `<image_id>-<k>[.jpg]`):
        the listed view when it was downloaded, else the image id's main downloaded view."""
        stem = Path(listed).stem
        if self.has(stem):
            return stem
        views = self.views.get(lpr4m_image_id(stem))
        return min(views, key=lpr4m_view_rank) if views else None

    def path(self, name: str) -> str:
        return str(self.files[name])


# --- manifests -----------------------------------------------------------------------------------


def _row(out_dir: Path, clip: list[str] | str | None, image: str, sku: str, shop: str | None, **more: Any) -> dict[str, Any]:
    """One manifest line; paths under OUT are stored relative to it, as model.data.write_manifest does."""
    base = out_dir.resolve()

    def rel(p: str) -> str:
        q = Path(p).resolve()
        return str(q.relative_to(base)) if q.is_relative_to(base) else str(q)

    d: dict[str, Any] = {}
    if clip is not None:
        d["clip"] = [rel(c) for c in clip] if isinstance(clip, list) else rel(clip)
    d.update(image=rel(image), sku=sku)
    if shop is not None:
        d["shop"] = shop
    d.update({k: v for k, v in more.items() if v not in (None, [], ())})
    return d


def _write(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _find(annotations: Path, pattern: str) -> list[Path]:
    return sorted(annotations.rglob(pattern))


def _load_json(annotations: Path, pattern: str) -> Any:
    found = _find(annotations, pattern)
    return json.loads(found[0].read_text()) if found else None


# --- the full release ----------------------------------------------------------------------------


def convert_full(annotations: Path, roots: Sequence[Path], out_dir: Path, counts: Counts) -> tuple[list[dict[str, Any]], ...]:
    """img2dataset downloads + full-release annotations -> (train rows, query rows, gallery rows)."""
    index = DownloadIndex(roots, out_dir / "files")
    counts.failed_downloads = index.failed
    parts = _find(annotations, "training_videoinfo_full_part_*.txt") or _find(annotations, "training_videoinfo_*.txt")
    train_specs = []
    for txt in parts:
        for line in txt.read_text(encoding="utf-8").splitlines():
            cols = line.split("\t")
            if len(cols) < 4 or not cols[0].strip():
                continue
            train_specs.append((cols[0].strip(), frame_ids(cols[1]), parse_list(cols[2]) if len(cols) > 2 else [], cols[3].strip()))
    gt: dict[str, list[str]] = _load_json(annotations, "test_videoid_to_gtimage*.json") or {}
    galleries: dict[str, list[str]] = _load_json(annotations, "test_liveid_to_gallery*.json") or {}
    frame_boxes: dict[str, Any] = _load_json(annotations, "test_frameid2gtbox*.json") or {}
    test_frames: dict[str, list[str]] = {}
    for fid in frame_boxes:
        test_frames.setdefault(clip_of_frame(Path(fid).stem), []).append(Path(fid).stem)
    if gt:  # also every downloaded frame of a test clip (the box file may not list frames without boxes)
        for name in index.files.keys() | index.tar_members.keys():
            if clip_of_frame(name) in gt:
                test_frames.setdefault(clip_of_frame(name), []).append(name)

    # Extract from tars only what the annotations use.
    wanted: set[str] = set()
    for _, fids, _, image_id in train_specs:
        wanted.update(fids)
        if (image_name := index.image_name(image_id)) is not None:
            wanted.add(image_name)
    for fids in test_frames.values():
        wanted.update(fids)
    for names in galleries.values():
        wanted.update(n for n in (index.image_name(x) for x in names) if n is not None)
    index.materialise(wanted)

    train = []
    counts.train_clips_total = len(train_specs)
    for video_id, fids, boxes, image_id in train_specs:
        keep = [i for i, f in enumerate(fids) if index.has(f)]
        counts.train_frames_missing += len(fids) - len(keep)
        image = index.image_name(image_id)
        if image is None:
            counts.train_images_missing += 1
        if not keep or image is None:
            continue
        kept_boxes = [boxes[i] for i in keep] if isinstance(boxes, list) and len(boxes) == len(fids) else boxes
        sku = lpr4m_image_id(image_id)
        train.append(_row(out_dir, [index.path(fids[i]) for i in keep], index.path(image), sku, lpr4m_live_id(video_id), boxes=kept_boxes))
    counts.train_clips = len(train)

    gallery = []
    gallery_ids: dict[str, set[str]] = {}
    for live, names in galleries.items():
        for iid, listed in lpr4m_main_views(names).items():
            counts.gallery_images_total += 1
            image = index.image_name(listed)
            if image is None:
                continue
            gallery.append(_row(out_dir, None, index.path(image), iid, live))
            gallery_ids.setdefault(live, set()).add(iid)
    counts.gallery_images = len(gallery)

    queries = []
    counts.test_queries_total = len(gt)
    for clip_id, images in gt.items():
        live = lpr4m_live_id(clip_id)
        fids = sorted(set(test_frames.get(clip_id, [])))
        kept = [f for f in fids if index.has(f)]
        counts.test_frames_missing += len(fids) - len(kept)
        truth = [iid for iid in lpr4m_main_views(images if isinstance(images, list) else [images]) if iid in gallery_ids.get(live, set())]
        if not truth:
            counts.test_queries_without_gallery_truth += 1
        if not kept or not truth:
            continue
        image = next(r["image"] for r in gallery if r["shop"] == live and r["sku"] == truth[0])
        boxes = [frame_boxes.get(f) for f in kept] if frame_boxes else None
        queries.append(_row(out_dir, [index.path(f) for f in kept], str(out_dir / image), truth[0], live, also=truth[1:], boxes=boxes))
    counts.test_queries = len(queries)
    return train, queries, gallery


# --- the 750K subset -----------------------------------------------------------------------------


def _subset_root(roots: Sequence[Path]) -> Path | None:
    for root in roots:
        if any((root / m).is_dir() for m in SUBSET_MARKERS) or any(root.glob("training_video_*")):
            return root
    return None


def convert_subset(annotations: Path, root: Path, out_dir: Path, counts: Counts) -> tuple[list[dict[str, Any]], ...]:
    """The unpacked LPR750K layout -> (train rows, query rows, gallery rows), via model.data.read_lpr4m."""
    train_rows, _ = read_lpr4m(root, "train", annotations=annotations)
    boxes_by_clip = _subset_train_boxes(annotations)
    train = []
    counts.train_clips_total = len(train_rows)
    for r in train_rows:
        assert isinstance(r.clip, tuple)
        kept = [f for f in r.clip if Path(f).is_file()]
        counts.train_frames_missing += len(r.clip) - len(kept)
        if not Path(r.image).is_file():
            counts.train_images_missing += 1
            continue
        if kept:
            train.append(_row(out_dir, kept, r.image, r.sku, r.shop, boxes=boxes_by_clip.get(Path(r.clip[0]).parent.name)))
    counts.train_clips = len(train)
    has_test = bool(_find(annotations, "test_videoid_to_gtimage*.json")) and bool(_find(annotations, "test_liveid_to_gallery*.json"))
    if not has_test:
        return train, [], []
    queries_rows, gallery_rows = read_lpr4m(root, "test", annotations=annotations)
    gallery = [_row(out_dir, None, g.image, g.sku, g.shop) for g in gallery_rows if Path(g.image).is_file()]
    counts.gallery_images_total, counts.gallery_images = len(gallery_rows), len(gallery)
    in_gallery = {(g["shop"], g["sku"]) for g in gallery}
    frame_boxes: dict[str, Any] = _load_json(annotations, "test_frameid2gtbox*.json") or {}
    queries = []
    counts.test_queries_total = len(queries_rows)
    for q in queries_rows:
        frames = (frame_files(q.clip) or []) if isinstance(q.clip, str) and Path(q.clip).is_dir() else []
        truth = [s for s in [q.sku, *q.also] if (q.shop, s) in in_gallery]
        if not truth:
            counts.test_queries_without_gallery_truth += 1
        if not frames or not truth:
            continue
        image = next(g.image for g in gallery_rows if g.shop == q.shop and g.sku == truth[0])
        boxes = [frame_boxes.get(Path(f).stem) for f in frames] if frame_boxes else None
        queries.append(_row(out_dir, str(q.clip), image, truth[0], q.shop, also=truth[1:], boxes=boxes))
    counts.test_queries = len(queries)
    return train, queries, gallery


def _subset_train_boxes(annotations: Path) -> dict[str, Any]:
    """clip id -> the box column ([2]) of the subset's training rows, when it parses as a list."""
    out: dict[str, Any] = {}
    for txt in _find(annotations, "training_videoinfo_*.txt"):
        for line in txt.read_text(encoding="utf-8").splitlines():
            cols = line.split("\t")
            if len(cols) > 2 and isinstance(boxes := parse_list(cols[2]), list) and boxes:
                out[cols[0]] = boxes
    return out


# --- command line --------------------------------------------------------------------------------


def convert(annotations: str | os.PathLike[str], images: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]) -> Counts:
    """Write the three manifests into `out`; returns the counts."""
    ann, roots, out_dir = Path(annotations), [Path(p) for p in images], Path(out)
    for p in [ann, *roots]:
        if not p.is_dir():
            raise FileNotFoundError(f"not a folder: {p}")
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = Counts()
    subset = _subset_root(roots)
    if subset is not None:
        counts.layout = "lpr750k-subset"
        train, queries, gallery = convert_subset(ann, subset, out_dir, counts)
    else:
        counts.layout = "full-release-img2dataset"
        train, queries, gallery = convert_full(ann, roots, out_dir, counts)
    _write(train, out_dir / "train.jsonl")
    _write(queries, out_dir / "test_queries.jsonl")
    _write(gallery, out_dir / "test_gallery.jsonl")
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `rice lpr4m` / `python -m model.lpr4m`."""
    parser.add_argument("--annotations", required=True, help="folder with the LPR4M annotation files (searched recursively)")
    parser.add_argument(
        "--images",
        required=True,
        nargs="+",
        help="img2dataset output folders (files or webdataset tars), or the unpacked LPR750K folder (query/, gallery/, ...)",
    )
    parser.add_argument("--out", required=True, help="where train.jsonl, test_queries.jsonl and test_gallery.jsonl go")


def run(args: argparse.Namespace) -> int:
    """Convert and print a summary; 1 when nothing usable was found."""
    counts = convert(args.annotations, args.images, args.out)
    sys.stdout.write(json.dumps(asdict(counts), indent=2) + "\n")
    sys.stdout.write(
        f"{counts.layout}: {counts.train_clips}/{counts.train_clips_total} training clips usable, "
        f"{counts.test_queries}/{counts.test_queries_total} test queries, "
        f"{counts.gallery_images}/{counts.gallery_images_total} gallery images; "
        f"{counts.failed_downloads} failed downloads skipped\n"
    )
    return 0 if counts.train_clips or counts.test_queries else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
