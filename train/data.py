"""Training and evaluation data: a JSONL manifest of (clip, product image, SKU, shop) rows, readers
for the LPR4M and MovingFashion layouts, a builder that turns the grocery layout (product photos +
catalog images) into clips, and the clip dataset (uniform frame sampling, 0/1 frame mask, cut-tail
and crop/flip/colour augmentation in training only). Decoding runs in DataLoader workers.
"""

from __future__ import annotations

import ast
import glob
import json
import multiprocessing as mp
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from model.config import PreprocessConfig
from model.preprocess import IMAGE_SUFFIXES, fit_frame, image_frame_fit, pad_to_square, prepare_frame, sample_indices, train_size
from train.img2dataset import read_member_ref


@dataclass(frozen=True)
class ClipRow:
    """One (clip, product image) pair. `clip` is a video file, a folder of frames, or a list of frame
    files; `also` lists further correct SKUs (an LPR4M query can have several ground-truth images)."""

    clip: str | tuple[str, ...]
    image: str
    sku: str
    shop: str | None = None
    group: str | None = None  # optional label for per-group reports, e.g. "packaged"
    also: tuple[str, ...] = ()
    id: str | None = None  # the clip's id in its dataset (LPR4M video_id), for condition lists
    conditions: tuple[tuple[str, str], ...] = ()  # e.g. LPR4M's (("duration", "long"), ("scale", "small"), ...)

    @property
    def truth(self) -> set[str]:
        return {self.sku, *self.also}


# --- manifests -----------------------------------------------------------------------------------


def _resolve(base: Path, p: str) -> str:
    return p if Path(p).is_absolute() else str(base / p)


def read_manifest(path: str | os.PathLike[str]) -> list[ClipRow]:
    """JSONL rows {"clip", "image", "sku", ["shop", "group", "also"]}; relative paths are relative to the file."""
    base = Path(path).parent
    rows = []
    with Path(path).open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            d = json.loads(line)
            try:
                clip = d.get("clip", [])  # gallery manifests have no clip
                clip = tuple(_resolve(base, c) for c in clip) if isinstance(clip, list) else _resolve(base, clip)
                cond = tuple(sorted((str(k), str(v)) for k, v in (d.get("conditions") or {}).items()))
                rows.append(
                    ClipRow(
                        clip,
                        _resolve(base, d["image"]),
                        str(d["sku"]),
                        d.get("shop"),
                        d.get("group"),
                        tuple(d.get("also", ())),
                        d.get("id"),
                        cond,
                    )
                )
            except KeyError as exc:
                raise ValueError(f"{path}:{n}: missing field {exc}") from exc
    return rows


def read_manifests(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[ClipRow]:
    """Rows of one or more manifests; each path may be a glob (`OUT/train-part-*.jsonl`), expanded in sorted order."""
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    files: list[str] = []
    for item in map(str, items):
        matched = sorted(glob.glob(item)) if glob.has_magic(item) else [item]  # noqa: PTH207  (absolute or relative patterns alike)
        if not matched:
            raise FileNotFoundError(f"no manifest matches {item}")
        files += matched
    return [row for f in files for row in read_manifest(f)]


def write_manifest(rows: Iterable[ClipRow], path: str | os.PathLike[str]) -> None:
    """Write rows as JSONL; paths under the manifest's folder are stored relative to it."""
    base = Path(path).parent.resolve()

    def rel(p: str) -> str:
        q = Path(p).resolve()
        return str(q.relative_to(base)) if q.is_relative_to(base) else str(q)

    with Path(path).open("w") as f:
        for r in rows:
            d: dict[str, Any] = asdict(r)
            d["clip"] = [rel(c) for c in r.clip] if isinstance(r.clip, tuple) else rel(r.clip)
            d["image"] = rel(r.image)
            d["also"] = list(r.also)
            d["conditions"] = dict(r.conditions)
            f.write(json.dumps({k: v for k, v in d.items() if v not in (None, [], {})}) + "\n")


def gallery_of(rows: Sequence[ClipRow]) -> list[ClipRow]:
    """The distinct product images of `rows` (the gallery when none is given separately)."""
    seen: dict[tuple[str, str, str | None], ClipRow] = {}
    for r in rows:
        seen.setdefault((r.image, r.sku, r.shop), r)
    return list(seen.values())


# --- public dataset layouts ----------------------------------------------------------------------


def lpr4m_live_id(clip_id: str) -> str:
    """`<live_id>-<start_ms>-<end_ms>` where live_id is a UUID (5 dash groups) -> the livestream id."""
    return "-".join(clip_id.split("-")[:5])


def lpr4m_image_id(name: str) -> str:
    """A shop image's identity: files `<image_id>-<k>.jpg` are views of one image id (5 dash groups),
    as the official LPR4M evaluation groups them."""
    return "-".join(Path(name).stem.split("-")[:5])


def lpr4m_view_rank(name: str) -> tuple[int, int, str]:
    """Sort key that puts an image id's main view first: the bare `<image_id>.jpg`, then the lowest
    numeric view index k of `<image_id>-<k>.jpg`."""
    extra = Path(name).stem.split("-")[5:]
    if not extra:
        return (0, 0, "")
    k = extra[0]
    return (1, int(k), "") if k.isdigit() else (2, 0, "-".join(extra))


def lpr4m_main_views(names: Iterable[str]) -> dict[str, str]:
    """image id -> the file name of its main view (the official evaluation keeps only that one),
    in the order the ids first appear."""
    views: dict[str, list[str]] = {}
    for name in names:
        views.setdefault(lpr4m_image_id(name), []).append(name)
    return {iid: min(group, key=lpr4m_view_rank) for iid, group in views.items()}


def read_lpr4m(
    root: str | os.PathLike[str], split: str = "train", annotations: str | os.PathLike[str] | None = None
) -> tuple[list[ClipRow], list[ClipRow]]:
    """LPR4M -> (query rows, gallery rows). Training: annotations/training_videoinfo_*.txt, gallery =
    the training images. Test: query/<clip_id>/ frames, gallery/<live_id>/ images, the ground-truth and
    gallery JSONs in annotations/; SKU = image id (`lpr4m_image_id`: views `<image_id>-<k>.jpg` are one
    product image; only the main view enters the gallery, as in the official evaluation), shop =
    livestream (per-shop galleries). `annotations` defaults to root/annotations. The public full
    release is converted by `train.lpr4m` instead."""
    root = Path(root)
    ann = Path(annotations) if annotations is not None else root / "annotations"
    if split == "train":
        rows = []
        for txt in sorted(t for t in ann.glob("training_videoinfo_*.txt") if "val" not in t.stem):  # not the validation split
            for line in txt.read_text().splitlines():
                cols = line.split("\t")
                if len(cols) < 9:
                    continue
                frames = tuple(_resolve(root, p) for p in ast.literal_eval(cols[1]))
                rows.append(ClipRow(frames, _resolve(root, cols[4]), cols[8], lpr4m_live_id(cols[0])))
        return rows, gallery_of(rows)
    gt = json.loads(next(ann.glob("test_videoid_to_gtimage*.json")).read_text())
    galleries = json.loads(next(ann.glob("test_liveid_to_gallery*.json")).read_text())

    def image_path(live: str, name: str) -> str:
        p = root / name
        return str(p) if p.exists() else str(root / "gallery" / live / Path(name).name)

    gallery = [ClipRow((), image_path(live, im), iid, live) for live, ims in galleries.items() for iid, im in lpr4m_main_views(ims).items()]
    queries = []
    for clip_id, images in gt.items():
        main = lpr4m_main_views(images)
        skus = list(main)
        live = lpr4m_live_id(clip_id)
        queries.append(ClipRow(str(root / "query" / clip_id), image_path(live, main[skus[0]]), skus[0], live, also=tuple(skus[1:])))
    return queries, gallery


def read_movingfashion(root: str | os.PathLike[str], split: str = "train") -> tuple[list[ClipRow], list[ClipRow]]:
    """MovingFashion (train.json / test.json, videos/, imgs/) -> (query rows, gallery rows). The SKU is
    the shop image; the test gallery is every test shop image (one global gallery), so there is no
    shop: the entry's `source` (the site a video came from) is a group, for per-group reports."""
    root = Path(root)
    table = json.loads((root / f"{split}.json").read_text())
    entries = table.values() if isinstance(table, dict) else table
    rows = []
    for e in entries:
        videos = e.get("video_paths") or [e["video_path"]]
        for v in videos:
            rows.append(ClipRow(_resolve(root, v), _resolve(root, e["img_path"]), Path(e["img_path"]).stem, group=e.get("source")))
    return rows, gallery_of(rows)


# --- frame reading and sampling ------------------------------------------------------------------


def frame_files(clip: str | tuple[str, ...]) -> list[str] | None:
    """The frame files of a frame list or a folder of frames (sorted, image suffixes only); None for a video file."""
    if isinstance(clip, tuple):
        return list(clip)
    if Path(clip).is_dir():
        return sorted(str(p) for p in Path(clip).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return None


def read_clip_frames(clip: str | tuple[str, ...], n: int, keep: float = 1.0) -> list[np.ndarray]:
    """Up to `n` BGR frames sampled uniformly from a video file, frame folder or frame list.
    `keep` < 1 drops that fraction of the sampled frames from the end (cut-tail)."""
    files = frame_files(clip)
    if files is not None:
        idx = sample_indices(len(files), n)
        idx = idx[: max(1, round(len(idx) * keep))]
        frames = [imread(files[i]) for i in idx]
        return [f for f in frames if f is not None]
    cap = cv2.VideoCapture(str(clip))
    try:
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if total <= 0:  # some containers do not store a count: decode everything, then sample
            all_frames = []
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                all_frames.append(frame)
            idx = sample_indices(len(all_frames), n)
            return [all_frames[i] for i in idx[: max(1, round(len(idx) * keep))]] if idx else []
        idx = sample_indices(total, n)
        wanted = set(idx[: max(1, round(len(idx) * keep))])
        out = []
        for i in range(max(wanted) + 1):
            if not cap.grab():
                break
            if i in wanted:
                ok, frame = cap.retrieve()
                if ok:
                    out.append(frame)
        return out
    finally:
        cap.release()


def worker_init(_: int) -> None:
    """DataLoader workers decode one clip each: extra OpenCV/torch threads only contend for cores."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def loader_options(workers: int) -> dict[str, Any]:
    """DataLoader keyword arguments for `workers` decode processes that are safe to start at any time.

    Workers are NOT forked from the calling process: by the time a loader starts, OpenCV and torch
    have usually run thread pools there (evaluation embeds the gallery first; training builds a
    loader per epoch after running the model), and a forked child inherits their locks held by
    threads that do not exist in it, so its first cv2/torch call can block forever (`rice evaluate`
    hung with its default 2 workers). A forkserver (spawn where there is none) starts workers from a
    clean process that imported train.data before any thread pool ran; each worker then unpickles
    the dataset (rows are plain dataclasses)."""
    if workers <= 0:
        return {"num_workers": 0}
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        # Import torch/cv2 once in the server (no thread pool has started there), not in every worker.
        ctx.set_forkserver_preload(["train.data"])
    return {"num_workers": workers, "multiprocessing_context": ctx, "worker_init_fn": worker_init}


def imread(path: str) -> np.ndarray | None:
    """cv2.imread that also reads `<tar>#<offset>+<size>` (an image inside a webdataset tar, read in place)."""
    data = read_member_ref(path) if ".tar#" in path else None
    if data is None:
        return cv2.imread(path, cv2.IMREAD_COLOR)
    img: np.ndarray | None = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return img


def read_image(path: str) -> np.ndarray:
    """BGR uint8 image (a file, or a tar member reference); ValueError when it cannot be decoded."""
    img = imread(path)
    if img is None:
        raise ValueError(f"unreadable image: {path}")
    return img


class ClipDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """(clip, image) pairs as uint8 tensors: frames [T, C, C, 3] zero-padded with mask [T], image [C, C, 3].

    Eval: the service's preprocessing (frames fit by pre.frame_fit, catalog images by pre.image_fit).
    Train (RICE v2 recipe): frames fit to `train_size` (256 for Resize 256 / crop 224), random crop, flip, colour jitter,
    and cut-tail (p=0.5 drop 0-90% of the frames from the end). Augmentation is seeded by
    (seed, epoch, index), so it does not depend on worker scheduling and resumes exactly.
    """

    def __init__(
        self,
        rows: Sequence[ClipRow],
        pre: PreprocessConfig,
        num_frames: int,
        train: bool,
        seed: int = 0,
        cut_tail_p: float = 0.5,
        with_image: bool = True,
    ) -> None:
        """`with_image=False` skips reading each row's product image (evaluation embeds the
        gallery on its own, so reading it per query would be wasted I/O)."""
        self.rows = list(rows)
        self.pre = pre
        self.num_frames = num_frames
        self.train = train
        self.sku_index = {s: i for i, s in enumerate(sorted({r.sku for r in self.rows}))}
        self.with_image = with_image
        self.seed = seed
        self.cut_tail_p = cut_tail_p
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def _augment(self, rgb: list[np.ndarray], rng: np.random.Generator, fit: str) -> list[np.ndarray]:
        """Same crop, flip and colour change for every frame of one clip (or for one image)."""
        c, big_size = self.pre.crop, train_size(self.pre)
        big = [fit_frame(x, big_size, big_size, fit) for x in rgb]
        top, left = rng.integers(0, big[0].shape[0] - c + 1, size=2)
        flip = rng.random() < 0.5
        alpha, beta = rng.uniform(0.8, 1.2), rng.uniform(-20, 20)
        out = []
        for x in big:
            x = x[top : top + c, left : left + c]
            x = x[:, ::-1] if flip else x
            out.append(cv2.convertScaleAbs(np.ascontiguousarray(x), alpha=alpha, beta=beta))
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        c = self.pre.crop
        image: np.ndarray | None
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            keep = 1.0 - rng.uniform(0.0, 0.9) if rng.random() < self.cut_tail_p else 1.0
            bgr = read_clip_frames(row.clip, self.num_frames, keep)
            frames = self._augment([cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in bgr], rng, self.pre.frame_fit) if bgr else []
            rgb = cv2.cvtColor(read_image(row.image), cv2.COLOR_BGR2RGB)
            rgb = pad_to_square(rgb) if self.pre.image_fit == "letterbox" else rgb
            image = self._augment([rgb], rng, image_frame_fit(self.pre))[0]
        else:
            frames = [prepare_frame(f, self.pre) for f in read_clip_frames(row.clip, self.num_frames)]
            image = prepare_frame(read_image(row.image), self.pre, whole=True) if self.with_image else None
        if not frames:
            raise ValueError(f"no frames decoded from {row.clip}")
        out = np.zeros((self.num_frames, c, c, 3), np.uint8)
        out[: len(frames)] = np.stack(frames)
        mask = torch.zeros(self.num_frames)
        mask[: len(frames)] = 1.0
        item = {"frames": torch.from_numpy(out), "mask": mask, "sku": torch.tensor(self.sku_index.get(row.sku, -1))}
        if image is not None:
            item["image"] = torch.from_numpy(np.ascontiguousarray(image))
        return item
