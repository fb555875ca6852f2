"""Retrieval evaluation: R@1/5/10 of clip queries against product images, with per-shop galleries
(LPR4M protocol: a query only sees its own shop's images) or one global gallery; JSON output.

`python -m train.evaluate --queries val.jsonl [--gallery gallery.jsonl] [--checkpoint ckpt.pt]`
Without --checkpoint the service's default (zero-shot) encoder is evaluated. Preprocessing is the
checkpoint's own and matches the service and training: frames by its frame_fit (Resize 256 + CenterCrop
224 of the squashed frame for `squash` checkpoints), gallery images by its image_fit (letterbox or squash).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.config import PreprocessConfig
from model.encoder import clip_embedding
from model.normalize import normalize
from model.preprocess import prepare_frame
from train.data import ClipDataset, ClipRow, gallery_of, loader_options, read_image, read_manifest
from train.recall import recall_at_k


@torch.no_grad()
def embed_images(backbone: nn.Module, pre: PreprocessConfig, paths: Sequence[str], device: torch.device, batch: int = 32) -> torch.Tensor:
    """Catalog images (prepared by pre.image_fit, as the service ingests them) -> L2-normalised embeddings [N, D]."""
    out = []
    for i in range(0, len(paths), batch):
        x = np.stack([prepare_frame(read_image(p), pre, whole=True) for p in paths[i : i + batch]])
        emb, _ = backbone(normalize(torch.from_numpy(x).to(device), pre))
        out.append(F.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_clips(
    backbone: nn.Module,
    pre: PreprocessConfig,
    rows: Sequence[ClipRow],
    num_frames: int,
    device: torch.device,
    batch: int = 8,
    workers: int = 2,
) -> torch.Tensor:
    """Clips -> masked mean of the frame embeddings, L2-normalised [M, D]; only real frames are encoded."""
    ds = ClipDataset(rows, pre, num_frames, train=False, with_image=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, **loader_options(workers))
    out = []
    for b in loader:
        mask = b["mask"].bool()  # [b, T]
        emb, _ = backbone(normalize(b["frames"][mask].to(device), pre))  # [f, D]
        frame_emb = emb.new_zeros(*mask.shape, emb.shape[1])
        frame_emb[mask.to(device)] = emb
        out.append(clip_embedding(frame_emb, mask.to(device)).cpu())
    return torch.cat(out)


def rank_gallery(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    gallery_skus: Sequence[str],
    query_shops: Sequence[str | None] | None = None,
    gallery_shops: Sequence[str | None] | None = None,
    k: int = 10,
) -> list[list[str]]:
    """Top-k gallery SKUs per query by cosine similarity; with shops, a query sees only its shop's items."""
    sim = queries @ gallery.T  # [M, N]
    if query_shops is not None and gallery_shops is not None:
        q = np.array([str(s) for s in query_shops])[:, None]
        g = np.array([str(s) for s in gallery_shops])[None, :]
        sim = sim.masked_fill(torch.from_numpy(q != g), float("-inf"))
    top = sim.topk(min(k, sim.shape[1]), dim=1)
    return [
        [gallery_skus[j] for j, v in zip(idx, val, strict=True) if v > float("-inf")]
        for idx, val in zip(top.indices.tolist(), top.values.tolist(), strict=True)
    ]


def evaluate_rows(
    backbone: nn.Module,
    pre: PreprocessConfig,
    queries: Sequence[ClipRow],
    gallery: Sequence[ClipRow],
    per_shop: bool = False,
    num_frames: int = 10,
    device: torch.device | None = None,
    workers: int = 2,
    ground_truth_ids: Sequence[str] | None = None,
    conditional: dict[str, set[str]] | None = None,
) -> dict[str, Any]:
    """R@1/5/10 overall, per query group (e.g. packaged / fresh), per manifest condition and per
    --conditional list, as a JSON-ready dict.

    Two denominators, both reported: "recall" counts the queries that have a ground-truth image in
    the gallery they are ranked against (ours: a query with nothing to find measures the download,
    not the model); "recall_all_ground_truth" divides the same hits by every ground-truth query
    (`ground_truth_ids`, e.g. the 20,079 of LPR4M's test; default: all query rows), as the authors'
    `lpr_eval.py` does, so queries lost to failed downloads count as misses."""
    device = device or torch.device("cpu")
    was_training = backbone.training
    backbone.eval()
    t0 = time.perf_counter()
    g = embed_images(backbone, pre, [r.image for r in gallery], device)
    q = embed_clips(backbone, pre, queries, num_frames, device, workers=workers)
    backbone.train(was_training)
    ranked = rank_gallery(
        q, g, [r.sku for r in gallery], [r.shop for r in queries] if per_shop else None, [r.shop for r in gallery] if per_shop else None
    )
    truth = [r.truth for r in queries]
    in_gallery = {(r.shop if per_shop else None, r.sku) for r in gallery}
    matched = [i for i, r in enumerate(queries) if any((r.shop if per_shop else None, s) in in_gallery for s in r.truth)]
    all_ids = list(ground_truth_ids) if ground_truth_ids is not None else [r.id or str(i) for i, r in enumerate(queries)]

    def both(ix: Sequence[int], total: int) -> dict[str, Any]:
        """R@k over the queries `ix` that have a gallery match, and the same hits over `total` ground-truth queries."""
        ok = [i for i in ix if i in matched_set]
        hits_r, hits_t = [ranked[i] for i in ok], [truth[i] for i in ok]
        return {
            "queries": len(ix),
            "queries_with_gallery_match": len(ok),
            "ground_truth_queries": total,
            "recall": recall_at_k(hits_r, hits_t),
            "recall_all_ground_truth": recall_at_k(hits_r, hits_t, denominator=total),
        }

    matched_set = set(matched)
    overall = both(range(len(queries)), len(all_ids))
    report: dict[str, Any] = {
        "queries": len(queries),
        "gallery": len(gallery),
        "protocol": "per-shop" if per_shop else "global",
        "num_frames": num_frames,
        "recall": overall["recall"],
        "recall_basis": f"{len(matched)} queries with a ground-truth image in their gallery (ours)",
        "recall_all_ground_truth": overall["recall_all_ground_truth"],
        "recall_all_ground_truth_basis": f"the same hits over all {len(all_ids)} ground-truth queries (the authors')",
    }
    groups: dict[str, list[int]] = defaultdict(list)
    conditions: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(queries):
        if r.group:
            groups[r.group].append(i)
        for k, v in r.conditions:
            conditions[f"{k}={v}"].append(i)
    report["by_group"] = {name: both(ix, len(ix)) for name, ix in sorted(groups.items())}
    if conditions:
        report["by_condition"] = {name: both(ix, len(ix)) for name, ix in sorted(conditions.items())}
    if conditional:
        index = {r.id: i for i, r in enumerate(queries) if r.id is not None}
        report["conditional"] = {
            name: both(
                [index[c] for c in sorted(ids) if c in index],
                len(ids & set(all_ids)) if ground_truth_ids is not None else len(ids & index.keys()),
            )
            for name, ids in conditional.items()
        }
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def read_sku_file(path: str | None) -> set[str] | None:
    """One SKU per line (None when no file is given)."""
    return None if path is None else {s.strip() for s in Path(path).read_text().splitlines() if s.strip()}


def read_id_file(path: str) -> set[str]:
    """Clip ids: a JSON list or object (its keys), else one id per line."""
    text = Path(path).read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {s.strip() for s in text.splitlines() if s.strip()}
    return {str(x) for x in value}


def build_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `rice evaluate` / `python -m train.evaluate`."""
    parser.add_argument("--queries", required=True, help="JSONL manifest of query clips (clip, image, sku[, shop, group])")
    parser.add_argument("--gallery", help="JSONL manifest of gallery images (default: the queries' distinct images)")
    parser.add_argument("--checkpoint", help="RICE checkpoint (default: the service's zero-shot encoder)")
    parser.add_argument("--per-shop", action="store_true", help="LPR4M protocol: each query is ranked against its own shop's images")
    parser.add_argument("--num-frames", type=int, default=10, help="frames sampled per query clip")
    parser.add_argument("--only-skus", help="file of SKUs: evaluate only queries of these products (gallery unchanged)")
    parser.add_argument("--exclude-skus", help="file of SKUs: drop queries of these products (gallery unchanged)")
    parser.add_argument(
        "--conditional",
        nargs="+",
        metavar="FILE",
        help="query clip ids (one per line, or a JSON list/object) of a condition, as the authors' lpr_eval.py --conditional: "
        "R@k is also reported over each file's queries (matched by the manifest's \"id\")",
    )
    parser.add_argument(
        "--ground-truth",
        help='JSON with the benchmark\'s ground-truth query ids ({"ids": [...]}) for R@k over all of them '
        "(default: QUERIES' .meta.json beside it, written by `rice lpr4m`; else the query rows)",
    )
    parser.add_argument("--workers", type=int, default=2, help="data loader worker processes")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)",
    )
    parser.add_argument("--out", help="also write the JSON report here")


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the JSON report; returns the exit status."""
    from model.checkpoint import load_encoder

    encoder = load_encoder(args.checkpoint)
    device = torch.device(args.device)
    queries = read_manifest(args.queries)
    only, exclude = read_sku_file(args.only_skus), read_sku_file(args.exclude_skus)
    queries = [r for r in queries if (only is None or r.sku in only) and (exclude is None or r.sku not in exclude)]
    gallery = read_manifest(args.gallery) if args.gallery else gallery_of(queries)
    meta = Path(args.ground_truth) if args.ground_truth else Path(args.queries).with_name(Path(args.queries).stem + ".meta.json")
    gt_ids = [str(x) for x in json.loads(meta.read_text())["ids"]] if meta.is_file() else None
    conditional = {Path(f).stem: read_id_file(f) for f in args.conditional or []}
    report = evaluate_rows(
        encoder.backbone.to(device),
        encoder.config.preprocess,
        queries,
        gallery,
        args.per_shop,
        args.num_frames,
        device,
        args.workers,
        ground_truth_ids=gt_ids,
        conditional=conditional,
    )
    report = {"model_version": encoder.model_version, "source": encoder.source, **report}
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    build_parser(p)
    sys.exit(run(p.parse_args()))
