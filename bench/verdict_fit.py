"""How well-conditioned is the verdict? Refit it offline on one livebench run's clips, test it on another's.

`rice livebench --out` keeps every clip's verdict signals (`rows[].signals`, exactly what the served
`match_probability` is computed from), so variants of the verdict (ridge strength, which signals, which
label) can be fitted on the calibration run (train split) and scored on a `val` run without re-running
either. The ridge strength is chosen by grouped k-fold cross-validation on the calibration clips
alone (folds by product, so a product's clips never sit on both sides); the `val` run only reports.

    python -m bench.verdict_fit --calib calib16.json [--calib calib32.json] --val val4.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from model.verdict import SIGNALS, VerdictModel, fit
from train.calibrate import auroc, pick_threshold, rates_at

# Signal subsets worth comparing (the rest get a zero coefficient, so a subset ships in the same format).
SUBSETS = {
    "all": SIGNALS,
    "no_raw_score": tuple(s for s in SIGNALS if s != "embedding_score"),
    "embedding_only": ("embedding_score", "embedding_margin", "standout"),
    "relative": ("embedding_margin", "standout", "log_inliers", "inlier_margin", "coverage", "agreement"),
    "geometric": ("log_inliers", "inlier_margin", "coverage", "agreement"),
    "geometric_standout": ("standout", "log_inliers", "inlier_margin", "coverage", "agreement"),
}
L2 = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0)


def load_rows(paths: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for p in paths:
        rows += json.loads(Path(p).read_text())["rows"]
    return rows


def arrays(rows: list[dict[str, Any]], label: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signals [N, S], labels [N], present mask [N]). label: "correct" (present and ranked first) or "present"."""
    x = np.array([r["signals"] for r in rows], np.float64)
    present = np.array([r["group"] != "absent" for r in rows])
    correct = np.array([bool(r["ranked"]) and r["ranked"][0] == r["sku"] for r in rows]) & present
    return x, (correct if label == "correct" else present).astype(np.float64), present


def fit_subset(x: np.ndarray, y: np.ndarray, subset: tuple[str, ...], l2: float) -> VerdictModel:
    """Fit on the subset's columns; the others get coefficient 0 (mean 0, scale 1)."""
    cols = [SIGNALS.index(s) for s in subset]
    m = fit(x[:, cols], y, l2=l2)
    coef, mean, scale = [0.0] * len(SIGNALS), [0.0] * len(SIGNALS), [1.0] * len(SIGNALS)
    for j, c in enumerate(cols):
        coef[c], mean[c], scale[c] = m.coef[j], m.mean[j], m.scale[j]
    return VerdictModel(tuple(coef), m.intercept, tuple(mean), tuple(scale))


def cv_auroc(rows: list[dict[str, Any]], subset: tuple[str, ...], l2: float, label: str, folds: int = 5) -> float:
    """Mean AUROC (right product ranked first vs absent) over product-grouped folds of the calibration clips."""
    x, y, present = arrays(rows, label)
    correct = arrays(rows, "correct")[1].astype(bool)
    skus = sorted({r["sku"] for r in rows})
    fold_of = {s: i % folds for i, s in enumerate(skus)}
    fold = np.array([fold_of[r["sku"]] for r in rows])
    out = []
    for k in range(folds):
        test = fold == k
        if not (correct[test].any() and (~present[test]).any()):
            continue
        p = fit_subset(x[~test], y[~test], subset, l2).probability(x[test])
        if correct[test].any():  # present but ranked wrong looks like absent: score what the verdict can know
            out.append(auroc(p[correct[test]], p[~present[test]]))
    return float(np.mean(out))


def evaluate(model: VerdictModel, rows: list[dict[str, Any]]) -> dict[str, Any]:
    x, _, present = arrays(rows, "correct")
    p = model.probability(x)
    groups = np.array([r["group"] for r in rows])
    correct = np.array([bool(r["ranked"]) and r["ranked"][0] == r["sku"] for r in rows])
    precision, accepted, rejected = rates_at(p[present], p[~present], model.threshold)
    acc = present & (p >= model.threshold)
    return {
        "auroc": round(auroc(p[present], p[~present]), 4),
        "auroc_never": round(auroc(p[groups == "never_trained"], p[~present]), 4),
        # what the verdict can know: a present product ranked wrong looks like an absent one
        "auroc_correct": round(auroc(p[present & correct], p[~present]), 4),
        "precision": round(precision, 4),
        "present_accepted": round(accepted, 4),
        "absent_rejected": round(rejected, 4),
        "accepted_correct": round(float(correct[acc].mean()), 4) if acc.any() else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", action="append", required=True, help="livebench report(s) of the calibration clips (train split)")
    ap.add_argument("--val", required=True, help="livebench report to score on (never fitted on)")
    ap.add_argument("--shipped", default="model/verdict_builtin.json", help="the current verdict, for comparison")
    ap.add_argument("--precision", type=float, default=0.9)
    ap.add_argument("--write", metavar="JSON", help="write the cross-validated choice (best CV AUROC) here")
    args = ap.parse_args()
    calib, val = load_rows(args.calib), load_rows([args.val])
    report: dict[str, Any] = {"calib_clips": len(calib), "val_clips": len(val)}
    report["shipped"] = evaluate(VerdictModel.from_json(Path(args.shipped).read_text()), val)
    variants = []
    for label in ("correct", "present"):
        for name, subset in SUBSETS.items():
            for l2 in L2:
                x, y, present = arrays(calib, label)
                model = fit_subset(x, y, subset, l2)
                p = model.probability(x)
                cal = pick_threshold(p[present], p[~present], args.precision)
                model = VerdictModel(model.coef, model.intercept, model.mean, model.scale, cal.threshold)
                variants.append(
                    {
                        "label": label,
                        "subset": name,
                        "l2": l2,
                        "cv_auroc": round(cv_auroc(calib, subset, l2, label), 4),
                        "val": evaluate(model, val),
                    }
                )
                variants[-1]["_model"] = model
    best = max(variants, key=lambda v: v["cv_auroc"])
    report["cv_choice"] = {k: v for k, v in best.items() if k != "_model"}
    report["variants"] = [{k: v for k, v in row.items() if k != "_model"} for row in variants]
    if args.write:
        Path(args.write).write_text(best["_model"].to_json() + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
