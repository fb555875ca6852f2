"""`rice retrain`: feedback -> training manifest -> candidate -> evaluation against the served model
on a pinned set -> quality gate -> promotion (reindex + switch) -> report.

1. Export: verdicts from the feedback store the RICE_* settings name (RICE_REDIS_URL or the SQLite
   RICE_GALLERY_PATH) that say which SKU was shown (`correct`, or `wrong` with the SKU) and kept
   their frames (`RICE_FEEDBACK_KEEP_FRAMES`) become clips (frame folders) paired with the SKU's
   catalog image from the catalog manifest; written beside it with the catalog rows as
   OUT/train.jsonl. Verdicts without frames hold vectors only and cannot train a backbone (they are
   counted; they serve as gallery views instead, RICE_ENRICH).
2. Train a candidate with `rice train` from the served checkpoint (`--init`; `--from-scratch` for
   the pretrained backbone), extra flags with `--train-arg`.
3. Evaluate served and candidate on the same pinned manifest (`--eval`, never the feedback): R@1/5,
   per query group, and, when some eval queries show products missing from the gallery, AUROC of
   the top-1 score (present vs absent) and a recalibrated threshold (`--calibrate` precision) with
   its precision on those queries.
4. Gate: promote only if the candidate's R@1 is at most `--max-r1-drop` below the served one's and
   its AUROC (when measured) is not lower.
5. Promote (with `--url` and `--catalog`): `rice reindex` of the catalog into the candidate's
   namespace, then POST /v1/admin/model on each replica. Enrichment views are vectors of the served
   model: they are not carried over (a new model starts without them).

Writes OUT/report.json and OUT/report.md either way. Exit status: 0 promoted (or, with --dry-run or
without --url, would be), 1 gated (the candidate is worse), 2 failed (bad input, training or
promotion failed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from train.data import ClipRow, gallery_of, read_manifest, write_manifest

EXIT_PROMOTED, EXIT_GATED, EXIT_FAILED = 0, 1, 2


@dataclass
class Exported:
    rows: list[ClipRow] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=lambda: {"no_sku": 0, "no_frames": 0, "sku_not_in_catalog": 0})


def export_feedback(store: Any, out: Path, catalog: list[ClipRow], since: float, now: float) -> Exported:
    """Verdicts naming a SKU, with frames, as training clips (frame folders under OUT/feedback)."""
    image_of = {r.sku: r.image for r in catalog}
    found = Exported()
    for fb in store.feedback_since(since, now):
        if fb.sku is None:
            found.skipped["no_sku"] += 1
        elif not fb.record.frames:
            found.skipped["no_frames"] += 1
        elif fb.sku not in image_of:
            found.skipped["sku_not_in_catalog"] += 1
        else:
            folder = out / "feedback" / fb.request_id
            folder.mkdir(parents=True, exist_ok=True)
            for i, jpeg in enumerate(fb.record.frames):
                (folder / f"{i:03d}.jpg").write_bytes(jpeg)
            found.rows.append(ClipRow(str(folder), image_of[fb.sku], fb.sku, shop=fb.record.shop_id, group="feedback"))
    return found


def evaluate(checkpoint: str | None, queries: list[ClipRow], gallery: list[ClipRow], num_frames: int, precision: float) -> dict[str, Any]:
    """R@1/5 (overall and per group) of the queries whose SKU is in the gallery; AUROC of the top-1
    score, present vs absent, when some queries' SKUs are not; a threshold for `precision`."""
    import torch

    from model.checkpoint import load_encoder
    from train.calibrate import auroc, pick_threshold, rates_at
    from train.evaluate import embed_clips, embed_images
    from train.recall import recall_at_k

    enc = load_encoder(checkpoint)
    device = torch.device("cpu")
    backbone = enc.backbone.eval()
    g = embed_images(backbone, enc.config.preprocess, [r.image for r in gallery], device).numpy()
    q = embed_clips(backbone, enc.config.preprocess, queries, num_frames, device, workers=0).numpy()
    skus = sorted({r.sku for r in gallery})
    col = {s: i for i, s in enumerate(skus)}
    per_sku = np.full((len(queries), len(skus)), -np.inf, np.float32)  # [M, S]: best image per SKU
    sim = q @ g.T  # [M, N]
    for j, r in enumerate(gallery):
        per_sku[:, col[r.sku]] = np.maximum(per_sku[:, col[r.sku]], sim[:, j])
    order = np.argsort(-per_sku, axis=1)[:, :10]
    ranked = [[skus[j] for j in row] for row in order]
    top1 = per_sku.max(axis=1)
    present = [i for i, r in enumerate(queries) if r.sku in col]
    absent = [i for i, r in enumerate(queries) if r.sku not in col]
    report: dict[str, Any] = {"model_version": enc.model_version, "queries": len(present), "absent_queries": len(absent)}
    report["recall"] = recall_at_k([ranked[i] for i in present], [queries[i].sku for i in present], ks=(1, 5))
    groups: dict[str, list[int]] = {}
    for i in present:
        if queries[i].group:
            groups.setdefault(str(queries[i].group), []).append(i)
    report["by_group"] = {g: recall_at_k([ranked[i] for i in ix], [queries[i].sku for i in ix], (1, 5)) for g, ix in sorted(groups.items())}
    if present and absent:
        p, a = top1[present], top1[absent]
        report["auroc"] = round(auroc(p, a), 4)
        cal = pick_threshold(p, a, precision)
        prec, accepted, rejected = rates_at(p, a, cal.threshold)
        report["threshold"] = {"value": round(cal.threshold, 4), "precision": round(prec, 4), "present_accepted": round(accepted, 4)}
        report["threshold"]["absent_rejected"] = round(rejected, 4)
    return report


def gate(served: dict[str, Any], candidate: dict[str, Any], max_r1_drop: float) -> tuple[bool, list[str]]:
    """(promote?, reasons): R@1 not lower by more than `max_r1_drop`, AUROC (when both have one) not lower."""
    reasons = []
    drop = served["recall"]["R@1"] - candidate["recall"]["R@1"]
    if drop > max_r1_drop + 1e-9:
        reasons.append(
            f"R@1 {candidate['recall']['R@1']:.4f} is {drop:.4f} below the served {served['recall']['R@1']:.4f} (allowed {max_r1_drop})"
        )
    if "auroc" in served and "auroc" in candidate and candidate["auroc"] < served["auroc"]:
        reasons.append(f"AUROC {candidate['auroc']:.4f} is below the served {served['auroc']:.4f}")
    return not reasons, reasons


def markdown(report: dict[str, Any]) -> str:
    s, c = report["served"], report["candidate"]
    lines = [
        f"# rice retrain: {report['decision']}",
        "",
        f"- served: `{s['model_version']}`; candidate: `{c['model_version']}`",
        f"- training rows: {report['train_rows']} ({report['feedback_rows']} from feedback; skipped {report['feedback_skipped']})",
        f"- evaluation: `{report['eval']}`, {s['queries']} queries of gallery products, {s['absent_queries']} of absent ones",
        "",
        "| metric | served | candidate |",
        "|---|---|---|",
        f"| R@1 | {s['recall']['R@1']} | {c['recall']['R@1']} |",
        f"| R@5 | {s['recall']['R@5']} | {c['recall']['R@5']} |",
    ]
    for grp in sorted(set(s["by_group"]) | set(c["by_group"])):
        lines.append(f"| R@1 {grp} | {s['by_group'].get(grp, {}).get('R@1', '-')} | {c['by_group'].get(grp, {}).get('R@1', '-')} |")
    if "auroc" in s:
        lines.append(f"| AUROC | {s['auroc']} | {c.get('auroc', '-')} |")
        lines.append(f"| threshold (precision) | {s['threshold']['value']} ({s['threshold']['precision']}) | "
                     f"{c['threshold']['value']} ({c['threshold']['precision']}) |")  # fmt: skip
    lines += ["", "Gate: " + ("passed" if report["passed"] else "; ".join(report["reasons"])), ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from index.stores import open_feedback_store
    from service.settings import Settings

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    catalog = read_manifest(args.catalog_manifest)
    queries = read_manifest(args.eval)
    gallery = read_manifest(args.eval_gallery) if args.eval_gallery else gallery_of(catalog)
    settings = Settings()
    store = open_feedback_store(settings.redis_url, settings.redis_feedback_prefix, settings.gallery_path, settings.feedback_max_records)
    try:
        exported = export_feedback(store, out, catalog, started - args.since_days * 86400.0, started)
    finally:
        store.close()
    train_rows = [*catalog, *exported.rows]
    write_manifest(train_rows, out / "train.jsonl")
    candidate = args.candidate
    if candidate is None:
        from train import train

        p = argparse.ArgumentParser()
        train.build_parser(p)
        init = [] if args.from_scratch else ["--init", args.served]
        targs = p.parse_args(
            ["--train", str(out / "train.jsonl"), "--out", str(out / "candidate"), "--no-progress", *init, *args.train_arg]
        )
        if train.run(targs) != 0:
            print("rice retrain: training failed", file=sys.stderr)
            return EXIT_FAILED
        candidate = str(out / "candidate" / "final.pt")
    served_eval = evaluate(args.served, queries, gallery, args.num_frames, args.calibrate)
    cand_eval = evaluate(candidate, queries, gallery, args.num_frames, args.calibrate)
    passed, reasons = gate(served_eval, cand_eval, args.max_r1_drop)
    report: dict[str, Any] = {
        "served": served_eval,
        "candidate": cand_eval,
        "candidate_checkpoint": candidate,
        "eval": str(args.eval),
        "train_rows": len(train_rows),
        "feedback_rows": len(exported.rows),
        "feedback_skipped": exported.skipped,
        "passed": passed,
        "reasons": reasons,
        "decision": "gated"
        if not passed
        else ("would promote (dry run)" if args.dry_run else "promoted" if args.url else "passed (no --url)"),
    }
    status = EXIT_PROMOTED if passed else EXIT_GATED
    if passed and args.url and not args.dry_run:
        status = _promote(args, candidate, report)
    report["seconds"] = round(time.time() - started, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    return status


def _promote(args: argparse.Namespace, candidate: str, report: dict[str, Any]) -> int:
    """`rice reindex` of the catalog into the candidate's namespace, then the switch on every --url."""
    from dataclasses import asdict

    from service.settings import Settings
    from service.state import store_for
    from tools.ingest import read_catalog
    from tools.reindex import run_reindex

    if not args.catalog:
        report.update(decision="failed: --catalog is needed to reindex before switching", passed=False)
        return EXIT_FAILED
    settings = Settings()
    store = store_for(settings)
    try:
        items = read_catalog(Path(args.catalog), args.shop_id)
        done = run_reindex(str(Path(candidate).resolve()), items, store, settings, args.url, args.api_key, None)
    finally:
        store.close()
    report["promotion"] = asdict(done)
    if done.failed or not done.switched:
        report["decision"] = "failed: the reindex or the switch did not complete"
        return EXIT_FAILED
    return EXIT_PROMOTED


def add_parser(sub: Any) -> None:
    """Register `rice retrain` on the CLI's subparsers."""
    r = sub.add_parser(
        "retrain",
        help="feedback -> train -> evaluate against the served model on a pinned set -> gate -> promote (reindex + switch)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("--served", required=True, help="the served checkpoint (the baseline, and the start of training)")
    r.add_argument("--catalog-manifest", required=True, help="JSONL of catalog (clip, image, sku) rows: training rows and SKU images")
    r.add_argument("--eval", required=True, help="the pinned evaluation manifest (never feedback); queries of absent SKUs give AUROC")
    r.add_argument("--eval-gallery", help="gallery manifest for --eval (default: the catalog manifest's images)")
    r.add_argument("--out", required=True, help="folder for the manifest, the candidate and report.json / report.md")
    r.add_argument("--candidate", help="evaluate and gate this checkpoint instead of training one")
    r.add_argument("--from-scratch", action="store_true", help="train from the pretrained backbone, not the served checkpoint")
    r.add_argument("--train-arg", action="append", default=[], help="a flag for `rice train` (repeat; e.g. --train-arg=--epochs=2)")
    r.add_argument("--since-days", type=float, default=30.0, help="feedback of the last N days")
    r.add_argument("--max-r1-drop", type=float, default=0.01, help="gate: largest allowed R@1 drop against the served model")
    r.add_argument("--calibrate", type=float, default=0.9, help="precision the recalibrated threshold aims at")
    r.add_argument("--num-frames", type=int, default=10, help="frames sampled per clip when evaluating")
    r.add_argument("--url", action="append", default=[], help="a replica's base URL to switch on promotion (repeat for each)")
    r.add_argument("--catalog", help="catalog folder or CSV (as for `rice reindex`) to embed into the candidate's namespace")
    r.add_argument("--shop-id", help="shop for every catalog image (a CSV's column overrides it)")
    r.add_argument("--api-key", default=None, help="admin API key for the switch (or RICE_CLIENT_API_KEY)")
    r.add_argument("--dry-run", action="store_true", help="export, train, evaluate and report; never reindex or switch")
    r.set_defaults(func=run)
