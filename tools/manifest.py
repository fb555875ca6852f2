"""`rice manifest`: your own catalog and clips -> the JSONL manifest `rice train` and `rice evaluate` read.

The catalog is what `rice ingest` takes (a folder with a sub-folder per SKU or images named by SKU,
one image, or a CSV of path,sku,shop_id). Clips are matched to SKUs the same way: a clip inside a
sub-folder named after a SKU (`clips/SKU-1/live-03.mp4`), else the catalog SKU its file name starts
with, the longest one that fits (`clips/SKU-1_live-03.mp4`, `clips/SKU-1.mp4`). Each clip becomes
one row per catalog image of its SKU. A clip that matches no catalog SKU is reported, not guessed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model.media import VIDEO_SUFFIXES
from tools.ingest import CatalogError, CatalogImage, read_catalog
from train.data import ClipRow, write_manifest


def clip_sku(clip: Path, clips_root: Path, skus: set[str]) -> str | None:
    """The SKU a clip shows: its sub-folder's name, else the longest catalog SKU its name starts with."""
    rel = clip.relative_to(clips_root)
    if len(rel.parts) > 1 and rel.parts[0] in skus:
        return rel.parts[0]
    fits = [s for s in skus if clip.stem == s or clip.stem.startswith((f"{s}_", f"{s}-", f"{s}."))]
    return max(fits, key=len) if fits else None


def build_rows(catalog: list[CatalogImage], clips_root: Path) -> tuple[list[ClipRow], list[Path]]:
    """(manifest rows, clips that match no catalog SKU)."""
    images: dict[str, list[CatalogImage]] = {}
    for item in catalog:
        images.setdefault(item.sku, []).append(item)
    if clips_root.is_file():
        clips, clips_root = [clips_root], clips_root.parent
    elif clips_root.is_dir():
        clips = sorted(p for p in clips_root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    else:
        raise CatalogError(f"{clips_root}: no such clip folder or file")
    if not clips:
        raise CatalogError(f"{clips_root}: no clips ({', '.join(sorted(VIDEO_SUFFIXES))}) in it or in its sub-folders")
    rows: list[ClipRow] = []
    unmatched: list[Path] = []
    for clip in clips:
        sku = clip_sku(clip, clips_root, set(images))
        if sku is None:
            unmatched.append(clip)
            continue
        rows += [ClipRow(str(clip), str(img.path), sku, img.shop_id) for img in images[sku]]
    return rows, unmatched


def run(args: argparse.Namespace) -> int:
    catalog = read_catalog(Path(args.catalog), args.shop_id)
    rows, unmatched = build_rows(catalog, Path(args.clips))
    if not rows:
        raise CatalogError(f"no clip of {args.clips} matches a SKU of {args.catalog} (name clips <SKU>_... or put them in <SKU>/)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(rows, out)
    summary = {"rows": len(rows), "clips": len({r.clip for r in rows}), "skus": len({r.sku for r in rows}), "out": str(out)}
    print(json.dumps({**summary, "unmatched": [str(p) for p in unmatched]}, indent=2))
    for clip in unmatched:
        print(f"rice manifest: {clip}: no catalog SKU matches its folder or name", file=sys.stderr)
    return 1 if unmatched else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `rice manifest` on the CLI's subparsers."""
    m = sub.add_parser(
        "manifest",
        help="turn your catalog and clips into a training manifest (JSONL) for `rice train` and `rice evaluate`",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("--catalog", required=True, help="catalog folder, image or CSV, as given to `rice ingest`")
    m.add_argument("--clips", required=True, help="a folder of clips (sub-folder per SKU, or names starting with the SKU), or one clip")
    m.add_argument("--out", required=True, help="the manifest to write (paths in it are relative to its folder when below it)")
    m.add_argument("--shop-id", help="shop for every catalog image (a CSV's shop_id column overrides it)")
    m.set_defaults(func=run)
