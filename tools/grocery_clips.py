"""Cold start: turn a folder of product photos + catalog images (the grocery layout) into training
and evaluation clips, written as real MP4 files plus a JSONL manifest.

`python -m tools.grocery_clips --root DATA --out DIR --split train --mode mixed`
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from tools.clipsynth import camera_motion_clip, write_video
from tools.helpfmt import RawShowDefaults
from tools.livescene import SCALES, livestream_clip
from train.data import ClipRow, read_image, write_manifest
from train.grocery import GroceryData, GroceryPhoto, read_grocery


def _render(job: tuple[list[str], str, int, int, int]) -> None:
    """One clip: each photo in turn filmed with a hand-held camera, frames split evenly between them.
    A first entry "live:SCALE" means a livestream scene instead: photos = product, background, distractors."""
    photos, out, frames, size, seed = job
    rng = np.random.default_rng(seed)
    if photos[0].startswith("live:"):
        product, background, *distractors = (read_image(p) for p in photos[1:])
        scene, _ = livestream_clip(product, background, distractors, photos[0].removeprefix("live:"), rng, frames, size)
        write_video(scene, out)
        return
    per = [frames // len(photos) + (i < frames % len(photos)) for i in range(len(photos))]
    clip: list[np.ndarray] = []
    for path, n in zip(photos, per, strict=True):
        img = read_image(path)
        clip += camera_motion_clip(img, rng, num_frames=max(n, 1), out_size=(size, size))
    write_video(clip, out)


def clutter_pool(photos: list[GroceryPhoto], sku: str, exclude: set[str]) -> list[str]:
    """Photos that may appear behind or beside `sku` in a live clip: other products, none of
    `exclude` (a held-out evaluation's products stay unseen, even as clutter)."""
    return [str(o.path) for o in photos if o.sku != sku and o.sku not in exclude]


def build_grocery_clips(
    data: GroceryData,
    out_dir: str | os.PathLike[str],
    split: str,
    mode: str = "motion",
    clips_per_photo: int = 1,
    frames: int = 16,
    size: int = 256,
    photos_per_clip: int = 4,
    seed: int = 0,
    workers: int = 2,
    exclude_clutter: set[str] | None = None,
) -> Path:
    """Write one MP4 per (photo, repeat) under out_dir/split and out_dir/split.jsonl; returns the manifest.

    mode "motion": one photo with camera motion, zoom, roll, blur and compression (as a seller
    filming one item); "photos": `photos_per_clip` photos of the same product in a row (several
    views of one product, like a seller turning it); "mixed": alternate the two; "live": the photo's
    product composited into a livestream scene (`tools.livescene`: small, medium or large in turn,
    a hand over it, a shelf of other products' photos behind it, distractors, camera motion).
    """
    if mode not in ("motion", "photos", "mixed", "live"):
        raise ValueError(f"unknown mode {mode!r}")
    out_dir = Path(out_dir)
    photos = data.photos(split)
    by_sku: dict[str, list[str]] = {}
    for ph in photos:
        by_sku.setdefault(ph.sku, []).append(str(ph.path))
    products = {p.sku: p for p in data.products}
    rng = np.random.default_rng(seed)
    jobs, rows = [], []
    for rep in range(clips_per_photo):
        for i, ph in enumerate(photos):
            use_photos = mode == "photos" or (mode == "mixed" and (i + rep) % 2 == 1)
            chosen = [str(ph.path)]
            if mode == "live":
                others = clutter_pool(photos, ph.sku, exclude_clutter or set())
                picks = rng.choice(len(others), size=1 + int(rng.integers(1, 4)), replace=False)
                chosen = [f"live:{list(SCALES)[(i + rep) % len(SCALES)]}", str(ph.path), *(others[j] for j in picks)]
            elif use_photos:
                others = [p for p in by_sku[ph.sku] if p != str(ph.path)]
                chosen += list(rng.choice(others, size=min(photos_per_clip - 1, len(others)), replace=False))
            out = out_dir / split / f"{ph.path.stem}-{rep}.mp4"
            jobs.append((chosen, str(out), frames, size, seed * 1_000_003 + rep * 100_003 + i))
            product = products[ph.sku]
            rows.append(ClipRow(str(out), str(product.catalog_image), ph.sku, group="packaged" if product.packaged else "fresh"))
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_render, jobs, chunksize=8))
    manifest = out_dir / f"{split}.jsonl"
    write_manifest(rows, manifest)
    return manifest


def write_grocery_gallery(data: GroceryData, path: str | os.PathLike[str]) -> None:
    """Every product's catalog image as a gallery manifest (clip field empty)."""
    rows = [ClipRow((), str(p.catalog_image), p.sku, group="packaged" if p.packaged else "fresh") for p in data.products]
    write_manifest(rows, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m tools.grocery_clips",
        description=__doc__,
        formatter_class=RawShowDefaults,
    )
    p.add_argument(
        "--root",
        required=True,
        help="the public Grocery Store Dataset's dataset/ folder (https://github.com/marcusklasson/GroceryStoreDataset), "
        "or a folder laid out the same way (classes.csv, train.txt, val.txt, the photos)",
    )
    p.add_argument("--out", required=True, help="where the clips (OUT/SPLIT/*.mp4), OUT/SPLIT.jsonl and OUT/gallery.jsonl go")
    p.add_argument("--split", default="train", help="the split whose photos become clips: train or val (any SPLIT.txt in --root)")
    p.add_argument(
        "--mode",
        default="motion",
        choices=["motion", "photos", "mixed", "live"],
        help="motion: one photo filmed by a hand-held camera; photos: several photos of the product in a row; "
        "mixed: the two in turn; live: the product composited into a livestream scene (tools.livescene)",
    )
    p.add_argument("--clips-per-photo", type=int, default=1, help="clips written per photo (each drawn anew)")
    p.add_argument("--frames", type=int, default=16, help="frames per clip")
    p.add_argument("--size", type=int, default=256, help="frame side in pixels")
    p.add_argument("--seed", type=int, default=0, help="the generated clips (the same seed, the same clips)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes rendering clips (default: every CPU)")
    p.add_argument("--holdout-every", type=int, default=0, help="also write heldout_skus.txt: every k-th product by class id")
    args = p.parse_args(argv)
    data = read_grocery(args.root)
    held = [p.sku for p in sorted(data.products, key=lambda p: p.class_id)][:: args.holdout_every] if args.holdout_every else []
    manifest = build_grocery_clips(
        data,
        args.out,
        args.split,
        args.mode,
        args.clips_per_photo,
        args.frames,
        args.size,
        seed=args.seed,
        workers=args.workers,
        exclude_clutter=set(held),
    )
    write_grocery_gallery(data, Path(args.out) / "gallery.jsonl")
    if held:
        (Path(args.out) / "heldout_skus.txt").write_text("\n".join(held) + "\n")
    print(manifest)


if __name__ == "__main__":
    main()
