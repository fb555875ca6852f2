"""A simulated feedback stream on livestream scenes: how far gallery enrichment alone lifts recognition.

Scenes are `rice livebench`'s (`tools.livescene`: the product small to large in a hand over a
defocused shelf with distractors, hand-held camera), built from a grocery-layout folder
($GROCERY_ROOT). Products split as livebench does: every `--heldout-every`-th product by class id is
"never-trained", half of those are absent from the gallery. For each product in the run, its photos
of the split are shuffled: the first `max(K)` make the feedback clips, the next `--test-clips` the
test clips (other photos of the same product, in other scenes); absent products get test clips only.

Everything goes through the service a user hits (the app in process): catalog images through
`POST /v1/gallery/items`; each feedback clip through `POST /v1/recognize`, then `POST /v1/feedback`
with the verdict a seller would give (`correct` when the top-1 is the product, else `wrong` with the
right SKU), under `RICE_ENRICH` (default here: corrected, so every one of the K clips becomes a
view); after 0 and each K clips per product, every test clip through `POST /v1/recognize`: R@1/5 for
trained and never-trained products and AUROC of the top-1 score, present vs absent.

    python -m bench.feedback_enrichment --data $GROCERY_ROOT --ks 1,3,10 --out enrich.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tools.livebench import Case, render_case, split_products, summarize
from tools.livescene import SCALES
from train.grocery import read_grocery


def _case(photo: str, sku: str, group: str, pool: list[str], rng: np.random.Generator, seed: int) -> Case:
    """One scene of `photo` at a random scale, with a shelf and 1-3 distractors drawn from `pool`."""
    picks = rng.choice(len(pool), size=min(1 + int(rng.integers(1, 4)), len(pool)), replace=False)
    scale = str(rng.choice(list(SCALES)))
    return Case(photo, sku, group, scale, pool[picks[0]], tuple(pool[j] for j in picks[1:]), seed)


def plan(
    data_root: str | Path, split: str, heldout_every: int, trained_every: int, max_k: int, test_clips: int, seed: int
) -> tuple[dict[str, list[Case]], list[Case]]:
    """(feedback clips per SKU, test clips): never-trained products all, trained ones every
    `trained_every`-th, absent ones (test clips only) all."""
    data = read_grocery(data_root)
    never, absent = split_products(data, heldout_every, 0)
    rng = np.random.default_rng(seed)
    photos = data.photos(split)
    trained = [p.sku for p in sorted(data.products, key=lambda p: p.class_id) if p.sku not in never][::trained_every]
    chosen = sorted(never) + trained
    feedback: dict[str, list[Case]] = {}
    tests: list[Case] = []
    for sku in chosen:
        group = "absent" if sku in absent else "never_trained" if sku in never else "trained"
        own = [str(p.path) for p in photos if p.sku == sku]
        pool = [str(p.path) for p in photos if p.sku != sku and (group != "absent" or p.sku in absent)]
        rng.shuffle(own)
        need = test_clips + (0 if group == "absent" else max_k)
        if len(own) < need:
            print(f"skipping {sku}: {len(own)} photos in {split}, {need} needed", file=sys.stderr)
            continue
        base = len(tests) * 1000 + len(feedback) * 100_003
        if group != "absent":
            feedback[sku] = [_case(own[i], sku, group, pool, rng, base + i) for i in range(max_k)]
        tests += [_case(own[max_k * (group != "absent") + i], sku, group, pool, rng, base + 500 + i) for i in range(test_clips)]
    return feedback, tests


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from model.checkpoint import load_encoder
    from service.app import create_app
    from service.settings import Settings

    ks = sorted({int(k) for k in args.ks.split(",")})
    feedback, tests = plan(args.data, args.split, args.heldout_every, args.trained_every, ks[-1], args.test_clips, args.seed)
    data = read_grocery(args.data)
    _, absent = split_products(data, args.heldout_every, 0)
    overrides: dict[str, Any] = dict(kv.split("=", 1) for kv in args.set)
    policy = {"enrich": args.policy, "enrich_view": args.view, "enrich_max_views": ks[-1]}
    settings = Settings(gallery_path=":memory:", checkpoint=args.checkpoint, **policy, **overrides)
    t0 = time.perf_counter()
    test_clips = [render_case(c) for c in tests]  # rendered once, sent at every K
    params = {"top_k": 10, "num_frames": args.num_frames}
    report: dict[str, Any] = {"policy": args.policy, "view": args.view, "split": args.split, "settings": overrides, "rounds": []}
    with TestClient(create_app(settings, encoder=load_encoder(args.checkpoint))) as client:
        for p in data.products:
            if p.sku not in absent:
                files = {"image": (p.catalog_image.name, p.catalog_image.read_bytes(), "image/jpeg")}
                client.post("/v1/gallery/items", files=files, data={"sku": p.sku}).raise_for_status()
        info = client.get("/v1/info").json()
        threshold = info["match_threshold"]
        views = {"correct": 0, "corrected": 0}
        fed = 0
        for k in [0, *ks]:
            while fed < k:  # one more confirmed clip of every product
                for sku, cases in feedback.items():
                    clip = render_case(cases[fed])
                    r = client.post("/v1/recognize", params=params, files={"file": ("clip.mp4", clip, "video/mp4")})
                    r.raise_for_status()
                    body = r.json()
                    top1 = body["results"][0]["sku"] if body["results"] else None
                    verdict = {"request_id": body["request_id"], "verdict": "correct", "sku": None}
                    if top1 != sku:
                        verdict.update(verdict="wrong", sku=sku)
                    views["correct" if top1 == sku else "corrected"] += 1
                    client.post("/v1/feedback", json=verdict).raise_for_status()
                fed += 1
            rows, request_ids = [], []
            for case, clip in zip(tests, test_clips, strict=True):
                r = client.post("/v1/recognize", params=params, files={"file": ("clip.mp4", clip, "video/mp4")})
                r.raise_for_status()
                res = r.json()["results"]
                request_ids.append(r.json()["request_id"])
                ranked = [x["sku"] for x in res]
                top1 = res[0]["score"] if res else -1.0
                rows.append({"sku": case.sku, "group": case.group, "scale": case.scale, "ranked": ranked, "top1": top1})
            summary = summarize(rows, threshold)
            stats = client.get("/v1/gallery/stats").json()
            offsets = view_offsets(client.app.state, request_ids, tests, threshold)  # type: ignore[attr-defined]
            report["rounds"].append(
                {"k": k, "gallery_items": stats["items"], "views_by_verdict": dict(views), **summary, "view_offsets": offsets}
            )
            print(f"K={k}: {json.dumps(_row(report['rounds'][-1]))}", file=sys.stderr)
    report.update(
        model_version=info["model_version"],
        match_threshold=threshold,
        products={g: sum(c.group == g for c in tests) // args.test_clips for g in ("trained", "never_trained", "absent")},
        test_clips={g: sum(c.group == g for c in tests) for g in ("trained", "never_trained", "absent")},
        seconds=round(time.perf_counter() - t0, 1),
    )
    return report


OFFSETS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3)


def view_offsets(state: Any, request_ids: list[str], tests: list[Case], threshold: float) -> dict[str, Any]:
    """Offline, on this round's own data: what if feedback views scored `offset` lower than catalog
    images? Each test request's record (clip + region vectors, as the service kept them) against the
    gallery as it stands (every item with its source); a SKU's score is its best item over the clip
    and region vectors (the service's max fusion). Also: the share of wrong top-1 answers won by a
    view (a view of another product "attracting" the clip: the scene, not the product, matches)."""
    _, items, vectors = state.rice.replica.gallery.export()
    skus = sorted({it[1] for it in items})
    col = {s: i for i, s in enumerate(skus)}
    is_view = np.array([it[4] == "feedback" for it in items])
    best_cat = np.full((len(tests), len(skus)), -2.0, np.float32)  # [M, S]
    best_view = np.full((len(tests), len(skus)), -2.0, np.float32)
    for m, rid in enumerate(request_ids):
        rec = state.feedback.store.get_request(rid, time.time())
        qs = np.vstack([rec.vector[None], *([] if rec.regions is None else [rec.regions])])  # [1 + R, D]
        sims = (qs @ vectors.T).max(axis=0)  # [N]
        for j, it in enumerate(items):
            target = best_view if is_view[j] else best_cat
            target[m, col[it[1]]] = max(target[m, col[it[1]]], sims[j])
    out: dict[str, Any] = {"csls": hub_corrected(state, request_ids, tests, items, vectors, is_view, threshold)}
    for offset in OFFSETS:
        scores = np.maximum(best_cat, best_view - offset)
        order = np.argsort(-scores, axis=1)
        rows = [
            {
                "sku": c.sku,
                "group": c.group,
                "scale": c.scale,
                "ranked": [skus[j] for j in order[m, :10]],
                "top1": float(scores[m, order[m, 0]]),
            }
            for m, c in enumerate(tests)
        ]
        summary = summarize(rows, threshold)
        present = [m for m, c in enumerate(tests) if c.group != "absent"]
        wrong = [m for m in present if skus[order[m, 0]] != tests[m].sku]
        won_by_view = sum(best_view[m, order[m, 0]] - offset > best_cat[m, order[m, 0]] for m in wrong)
        out[str(offset)] = {
            "trained_r1": summary["recall"]["trained"]["all"].get("R@1"),
            "never_trained_r1": summary["recall"]["never_trained"]["all"].get("R@1"),
            "auroc_all": summary["open_set"].get("all", {}).get("auroc"),
            "wrong_won_by_a_view": round(won_by_view / max(len(wrong), 1), 3),
        }
    return out


def hub_corrected(
    state: Any, request_ids: list[str], tests: list[Case], items: list[Any], vectors: np.ndarray, is_view: np.ndarray, threshold: float
) -> dict[str, Any]:
    """Offline: every item's score lowered by `lam` x its hubness (CSLS-like, item side): the mean of
    its 5 highest similarities to feedback views (livestream clips) of other SKUs. A view that looks
    like every clip is penalised more than a catalog image that looks like none."""
    if not is_view.any():
        return {}
    skus_of = np.array([it[1] for it in items])
    views = np.flatnonzero(is_view)
    sim = vectors @ vectors[views].T  # [N, V]
    sim[skus_of[:, None] == skus_of[views][None, :]] = -np.inf  # only other products' views
    top = -np.sort(-sim, axis=1)[:, :5]
    hub = np.where(np.isfinite(top), top, np.nan)
    hub = np.nan_to_num(np.nanmean(hub, axis=1), nan=0.0)  # [N]
    skus = sorted(set(skus_of))
    col = np.array([skus.index(s) for s in skus_of])
    out = {}
    for lam in (0.5, 1.0):
        rows = []
        for m, rid in enumerate(request_ids):
            rec = state.feedback.store.get_request(rid, time.time())
            qs = np.vstack([rec.vector[None], *([] if rec.regions is None else [rec.regions])])
            s = (qs @ vectors.T).max(axis=0) - lam * hub  # [N]
            per = np.full(len(skus), -np.inf)
            np.maximum.at(per, col, s)
            order = np.argsort(-per)[:10]
            rows.append(
                {
                    "sku": tests[m].sku,
                    "group": tests[m].group,
                    "scale": tests[m].scale,
                    "ranked": [skus[j] for j in order],
                    "top1": float(per.max()),
                }
            )
        summary = summarize(rows, threshold)
        out[str(lam)] = {
            "trained_r1": summary["recall"]["trained"]["all"].get("R@1"),
            "never_trained_r1": summary["recall"]["never_trained"]["all"].get("R@1"),
            "auroc_all": summary["open_set"].get("all", {}).get("auroc"),
        }
    return out


def _row(r: dict[str, Any]) -> dict[str, Any]:
    """The table row of one round."""
    rec, open_set = r["recall"], r["open_set"]
    return {
        "k": r["k"],
        "trained_r1": rec["trained"]["all"].get("R@1"),
        "trained_r5": rec["trained"]["all"].get("R@5"),
        "never_trained_r1": rec["never_trained"]["all"].get("R@1"),
        "never_trained_r5": rec["never_trained"]["all"].get("R@5"),
        "auroc_all": open_set.get("all", {}).get("auroc"),
        "auroc_never_trained": open_set.get("never_trained", {}).get("auroc"),
        "present_accepted": open_set.get("all", {}).get("present_accepted"),
        "absent_rejected": open_set.get("all", {}).get("absent_rejected"),
        "gallery_items": r["gallery_items"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="grocery-layout folder ($GROCERY_ROOT)")
    p.add_argument("--checkpoint", help="RICE checkpoint; default: the built-in encoder")
    p.add_argument("--split", default="train", choices=["train", "val"], help="photos the clips are made of (train has ~24 per product)")
    p.add_argument("--ks", default="1,3,10", help="confirmed clips per SKU after which the test clips are measured")
    p.add_argument("--test-clips", type=int, default=2, help="test clips per product (other photos than the feedback clips')")
    p.add_argument("--heldout-every", type=int, default=4, help="every k-th product (by class id) is never-trained; half of those absent")
    p.add_argument("--trained-every", type=int, default=4, help="take every k-th trained product (all never-trained and absent ones)")
    p.add_argument("--policy", default="corrected", choices=["confirmed", "corrected"], help="RICE_ENRICH for the run")
    p.add_argument("--view", default="clip", choices=["clip", "closest"], help="RICE_ENRICH_VIEW for the run")
    p.add_argument("--num-frames", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a service setting for this run")
    p.add_argument("--out", help="write the report to this JSON file")
    args = p.parse_args()
    report = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps([_row(r) for r in report["rounds"]], indent=1))


if __name__ == "__main__":
    main()
