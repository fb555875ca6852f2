"""`rice livebench` / `python -m tools.livebench`: recognition under livestream conditions, through
the service path a user hits.

From a grocery-layout folder (the public Grocery Store Dataset, github.com/marcusklasson/GroceryStoreDataset,
at $GROCERY_ROOT) it builds, for each photo of a split (`train` or `val`; never `test`), one clip per
product scale (small / medium / large, `tools.livescene`): the product over a defocused shelf with
distractor products, a hand over it, hand-held camera motion, sometimes frames before it is raised.
The catalog images go into the app's gallery through `POST /v1/gallery/items`, except the "absent"
products'; every clip goes through `POST /v1/recognize` as an MP4 (the default pipeline, or the
settings given with --set).

Products are split like `tools.grocery_clips --holdout-every K`: every K-th product by class id is
"never-trained" (what a checkpoint trained with --exclude-skus on that list never saw); half of
those (`--absent-half`) are left out of the gallery: their clips show no catalog product, and no
distractor in them is a catalog product either. The report gives R@1/5 per scale for trained and
never-trained products, and the open-set figures of the top-1 score: AUROC present vs absent
(all, and never-trained only) and, at the operating threshold, the precision of match answers,
the share of present clips accepted and of absent clips rejected.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from model.verdict import fit as fit_verdict_model
from model.verdict import signals
from pipeline.verify import candidates_from_results
from tools.clipsynth import encode_video
from tools.livescene import SCALES, livestream_clip
from train.calibrate import auroc, pick_threshold, rates_at
from train.data import read_image
from train.grocery import GroceryData, read_grocery
from train.recall import recall_at_k


@dataclass(frozen=True)
class Case:
    """One benchmark clip: which photo, at which scale, with which clutter; `group` is trained,
    never-trained or absent."""

    photo: str
    sku: str
    group: str
    scale: str
    background: str
    distractors: tuple[str, ...]
    seed: int


def split_products(data: GroceryData, heldout_every: int, absent_half: int) -> tuple[set[str], set[str]]:
    """(never-trained SKUs, absent SKUs): every k-th product by class id, and every other one of those."""
    held = [p.sku for p in sorted(data.products, key=lambda p: p.class_id)][::heldout_every]
    return set(held), set(held[absent_half::2])


def build_cases(
    data: GroceryData,
    split: str,
    heldout_every: int = 4,
    absent_half: int = 0,
    scales: tuple[str, ...] = tuple(SCALES),
    every: int = 1,
    seed: int = 0,
) -> list[Case]:
    """Every `every`-th photo of the split, once per scale. Backgrounds and distractors come from the
    split's other products (only absent products' photos in an absent clip)."""
    never, absent = split_products(data, heldout_every, absent_half)
    photos = data.photos(split)
    rng = np.random.default_rng(seed)
    cases: list[Case] = []
    for i, ph in enumerate(photos[::every]):
        group = "absent" if ph.sku in absent else "never_trained" if ph.sku in never else "trained"
        pool = [str(o.path) for o in photos if o.sku != ph.sku and (group != "absent" or o.sku in absent)]
        if not pool:
            raise ValueError(f"no clutter photos for {ph.sku}: an absent clip needs at least two absent products")
        for scale in scales:
            picks = rng.choice(len(pool), size=min(1 + int(rng.integers(1, 4)), len(pool)), replace=False)
            cases.append(
                Case(
                    str(ph.path),
                    ph.sku,
                    group,
                    scale,
                    pool[picks[0]],
                    tuple(pool[j] for j in picks[1:]),
                    seed * 1_000_003 + i * 10 + len(cases),
                )
            )
    return cases


def render_case(case: Case, frames: int = 16, size: int = 256) -> bytes:
    """The case's clip as MP4 bytes (deterministic in the case's seed)."""
    rng = np.random.default_rng(case.seed)
    clip, _ = livestream_clip(
        read_image(case.photo), read_image(case.background), [read_image(d) for d in case.distractors], case.scale, rng, frames, size
    )
    return encode_video(clip)


def _recall(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"clips": len(rows)}
    if rows:
        out.update({k: v for k, v in recall_at_k([r["ranked"] for r in rows], [r["sku"] for r in rows], ks=(1, 5)).items()})
    return out


def summarize(rows: list[dict[str, Any]], threshold: float, key: str = "top1") -> dict[str, Any]:
    """Recall per group, scale and product kind, and the open-set figures of `key` (the top-1 score,
    or the verdict's "probability") at `threshold`, from per-clip rows."""
    report: dict[str, Any] = {"recall": {}, "open_set": {}}
    for group in ("trained", "never_trained"):
        in_group = [r for r in rows if r["group"] == group]
        report["recall"][group] = {"all": _recall(in_group)}
        for scale in SCALES:
            report["recall"][group][scale] = _recall([r for r in in_group if r["scale"] == scale])
        for kind in ("packaged", "fresh"):
            report["recall"][group][kind] = _recall([r for r in in_group if r.get("kind") == kind])
    present = [r for r in rows if r["group"] != "absent"]
    absent = np.array([r[key] for r in rows if r["group"] == "absent"])
    if len(present) and len(absent):
        for name, subset in (("all", present), ("never_trained", [r for r in present if r["group"] == "never_trained"])):
            scores = np.array([r[key] for r in subset])
            if not len(scores):
                continue
            precision, accepted, rejected = rates_at(scores, absent, threshold)
            correct = [r for r in subset if r[key] >= threshold]
            report["open_set"][name] = {
                "auroc": round(auroc(scores, absent), 4),
                "precision": round(precision, 4),  # present among match answers (present and absent weighted equally)
                "present_accepted": round(accepted, 4),
                "absent_rejected": round(rejected, 4),
                # of the accepted present clips, the share whose top-1 is the right product
                "accepted_correct": round(float(np.mean([r["ranked"][0] == r["sku"] for r in correct])), 4) if correct else None,
            }
        for scale in SCALES:
            scores = np.array([r[key] for r in present if r["scale"] == scale])
            scale_absent = np.array([r[key] for r in rows if r["group"] == "absent" and r["scale"] == scale])
            if len(scores) and len(scale_absent):
                report["open_set"][f"auroc_{scale}"] = round(auroc(scores, scale_absent), 4)
    return report


def run_livebench(
    data_root: str | Path,
    checkpoint: str | None = None,
    split: str = "val",
    every: int = 1,
    heldout_every: int = 4,
    absent_half: int = 0,
    num_frames: int = 10,
    seed: int = 0,
    overrides: dict[str, str] | None = None,
    threshold: float | None = None,
    calibrate_precision: float | None = None,
    progress: bool = False,
    fit_verdict: str | None = None,
    size: int = 256,
) -> dict[str, Any]:
    """Run the benchmark through an in-process app; see the module docstring. `threshold` overrides
    the served threshold for the open-set figures (sent as `min_score`); `calibrate_precision` also
    reports the threshold this run's scores would calibrate to. `fit_verdict`: fit the verdict model
    (`model.verdict`) on this run's clips, its threshold for `calibrate_precision` (default 0.9), and
    write it to that JSON file."""
    from fastapi.testclient import TestClient

    from model.checkpoint import load_encoder
    from service.app import create_app
    from service.settings import Settings

    data = read_grocery(data_root)
    kind = {p.sku: "packaged" if p.packaged else "fresh" for p in data.products}
    _, absent = split_products(data, heldout_every, absent_half)
    cases = build_cases(data, split, heldout_every, absent_half, every=every, seed=seed)
    settings = Settings(gallery_path=":memory:", checkpoint=checkpoint, **(overrides or {}))  # type: ignore[arg-type]
    rows: list[dict[str, Any]] = []
    served_s, frames_encoded = 0.0, 0
    timings: dict[str, float] = defaultdict(float)
    t0 = time.perf_counter()
    with TestClient(create_app(settings, encoder=load_encoder(checkpoint))) as client:
        for p in data.products:
            if p.sku in absent:
                continue
            files = {"image": (p.catalog_image.name, p.catalog_image.read_bytes(), "image/jpeg")}
            client.post("/v1/gallery/items", files=files, data={"sku": p.sku}).raise_for_status()
        info = client.get("/v1/info").json()
        params: dict[str, Any] = {"top_k": 10, "num_frames": num_frames}
        if threshold is not None:
            params["min_score"] = threshold
        for n, case in enumerate(cases):
            clip = render_case(case, size=size)
            t = time.perf_counter()
            r = client.post("/v1/recognize", params=params, files={"file": ("clip.mp4", clip, "video/mp4")})
            served_s += time.perf_counter() - t
            r.raise_for_status()
            body = r.json()
            frames_encoded += body["frames_used"]
            for stage, ms in body["timings_ms"].items():
                timings[stage] += ms
            ranked = [x["sku"] for x in body["results"]]
            top1 = body["results"][0]["score"] if body["results"] else -1.0
            scores = [round(x["score"], 5) for x in body["results"]]
            checked = min(settings.verify_frames, body["frames_used"])
            x = signals(candidates_from_results(body["results"], checked))
            prob = body.get("match_probability")
            rows.append(
                {
                    "sku": case.sku,
                    "group": case.group,
                    "kind": kind[case.sku],
                    "scale": case.scale,
                    "ranked": ranked,
                    "top1": top1,
                    "scores": scores,
                    "probability": -1.0 if prob is None else prob,
                    "signals": [round(float(v), 5) for v in x],
                    "inliers": [res.get("inliers") for res in body["results"]],
                }
            )
            if progress and (n + 1) % 50 == 0:
                print(f"{n + 1}/{len(cases)} clips", file=sys.stderr)
        operating = info["match_threshold"] if threshold is None else threshold
    report: dict[str, Any] = {
        "data": str(data_root),
        "split": split,
        "model_version": info["model_version"],
        "settings": overrides or {},
        "frame_size": size,
        "gallery_products": len(data.products) - len(absent),
        "clips": {g: sum(r["group"] == g for r in rows) for g in ("trained", "never_trained", "absent")},
        "match_threshold": operating,
        **summarize(rows, operating),
        "frames_per_s": round(frames_encoded / served_s, 1) if served_s else None,
        "ms_per_clip": {k: round(v / max(len(rows), 1), 1) for k, v in sorted(timings.items())},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    present = [r["top1"] for r in rows if r["group"] != "absent"]
    absent_scores = [r["top1"] for r in rows if r["group"] == "absent"]
    if calibrate_precision is not None and present and absent_scores:
        report["calibration"] = asdict(pick_threshold(np.array(present), np.array(absent_scores), calibrate_precision))
    if any(r["probability"] >= 0 for r in rows):  # a verdict ran: its open-set figures at the served threshold
        report["verdict"] = {
            "threshold": info.get("match_probability"),
            **summarize(rows, float(info.get("match_probability") or 0.5), "probability"),
        }
        report["verdict"].pop("recall")
    if fit_verdict:
        report["fitted_verdict"] = _fit_verdict(rows, calibrate_precision or 0.9, fit_verdict)
    report["open_set_scores"] = {"present": present, "absent": absent_scores}
    report["rows"] = rows
    return report


def _fit_verdict(rows: list[dict[str, Any]], precision: float, path: str) -> dict[str, Any]:
    """Fit the verdict on the clips' signals: 1 = the product is present and ranked first."""
    x = np.array([r["signals"] for r in rows])
    y = np.array([r["group"] != "absent" and bool(r["ranked"]) and r["ranked"][0] == r["sku"] for r in rows], np.float64)
    model = fit_verdict_model(x, y)
    prob = model.probability(x)
    present = np.array([r["group"] != "absent" for r in rows])
    cal = pick_threshold(prob[present], prob[~present], precision)
    model = replace(model, threshold=cal.threshold)
    Path(path).write_text(model.to_json() + "\n")
    return {"path": path, "auroc_fit": round(auroc(prob[present], prob[~present]), 4), "calibration": asdict(cal)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        help="the public Grocery Store Dataset's dataset/ folder ($GROCERY_ROOT; "
        "https://github.com/marcusklasson/GroceryStoreDataset): classes.csv, train.txt, val.txt and the photos",
    )
    p.add_argument("--checkpoint", help="RICE checkpoint; default: the built-in encoder")
    p.add_argument("--split", default="val", choices=["train", "val"], help="the split whose photos become scenes")
    p.add_argument("--every", type=int, default=1, help="use every k-th photo of the split (smaller, faster runs)")
    p.add_argument("--heldout-every", type=int, default=4, help="every k-th product (by class id) is never-trained")
    p.add_argument("--absent-half", type=int, default=0, choices=[0, 1], help="which half of those is left out of the gallery")
    p.add_argument("--num-frames", type=int, default=10, help="frames sampled per clip")
    p.add_argument("--seed", type=int, default=0, help="the generated scenes (the same seed, the same clips)")
    p.add_argument("--threshold", type=float, help="operating threshold for the open-set figures; default: the served one")
    p.add_argument("--calibrate", type=float, metavar="PRECISION", help="also report the threshold for this precision")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a service setting for this run, e.g. regions=off")
    p.add_argument("--out", help="also write the report (with per-clip scores) to this JSON file")
    p.add_argument("--size", type=int, default=256, help="clip frame side in pixels (a 720p stream gives verification more)")
    p.add_argument("--fit-verdict", metavar="JSON", help="fit the verdict model on this run's clips and write it here")


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    overrides = dict(kv.split("=", 1) for kv in args.set)
    report = run_livebench(
        args.data,
        args.checkpoint,
        args.split,
        args.every,
        args.heldout_every,
        args.absent_half,
        args.num_frames,
        args.seed,
        overrides,
        args.threshold,
        args.calibrate,
        progress=True,
        fit_verdict=args.fit_verdict,
        size=args.size,
    )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    shown = {k: v for k, v in report.items() if k not in ("open_set_scores", "rows")}
    print(json.dumps(shown, indent=1))
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    run_from_args(p.parse_args())


if __name__ == "__main__":
    main()
