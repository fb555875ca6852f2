"""bench.verdict_fit: refitting the verdict offline from livebench rows (signal subsets ship in the same format)."""

from __future__ import annotations

import numpy as np

from bench.verdict_fit import SUBSETS, arrays, cv_auroc, evaluate, fit_subset
from model.verdict import SIGNALS, VerdictModel


def _rows(seed: int, n: int = 120) -> list[dict[str, object]]:
    """Livebench-like rows: right top-1 clips have more inliers than absent and wrongly ranked ones."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, object]] = []
    for i in range(n):
        group = ("trained", "never_trained", "absent")[i % 3]
        right = group != "absent" and rng.random() < 0.5
        x = rng.normal(0, 1, len(SIGNALS))
        x[SIGNALS.index("log_inliers")] += 2.5 if right else 0.0
        sku = f"p{i % 12}"
        rows.append({"sku": sku, "group": group, "ranked": [sku if right else "other"], "signals": x.tolist()})
    return rows


def test_a_subset_fit_zeroes_the_other_signals_and_round_trips() -> None:
    rows = _rows(0)
    x, y, present = arrays(rows, "correct")
    assert x.shape == (120, len(SIGNALS)) and y.sum() > 0 and (~present).sum() == 40
    model = fit_subset(x, y, SUBSETS["geometric"], l2=1.0)
    dropped = [j for j, s in enumerate(SIGNALS) if s not in SUBSETS["geometric"]]
    assert all(model.coef[j] == 0.0 for j in dropped) and model.coef[SIGNALS.index("log_inliers")] > 0.5
    assert VerdictModel.from_json(model.to_json()) == model  # ships as model/verdict_builtin.json does


def test_cross_validation_and_evaluation_see_the_separable_signal() -> None:
    rows, held_out = _rows(1), _rows(2)
    assert cv_auroc(rows, SUBSETS["geometric"], 1.0, "correct") > 0.8
    x, y, _ = arrays(rows, "correct")
    report = evaluate(fit_subset(x, y, SIGNALS, 1.0), held_out)
    assert report["auroc_correct"] > 0.8 and report["auroc"] > 0.55  # wrongly ranked present clips look absent
