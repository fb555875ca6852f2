"""R@k as the RICE paper reports it: a query is a hit at k if any ground truth is in its top k."""

from __future__ import annotations

from collections.abc import Sequence


def recall_at_k(
    ranked: Sequence[Sequence[str]], truth: Sequence[str | set[str]], ks: Sequence[int] = (1, 5, 10), denominator: int | None = None
) -> dict[str, float]:
    """ranked[i] = SKUs for query i, best first; truth[i] = its SKU (or set of SKUs).

    Hits are divided by the number of queries, or by `denominator` when given: the authors divide by
    every ground-truth query of the benchmark, counting those that could not be evaluated as misses."""
    if len(ranked) != len(truth):
        raise ValueError("one ranking per query expected")
    out: dict[str, float] = {}
    n = max(len(ranked) if denominator is None else denominator, 1)
    for k in ks:
        hits = 0
        for r, t in zip(ranked, truth, strict=True):
            gt = t if isinstance(t, set) else {t}
            hits += any(x in gt for x in r[:k])
        out[f"R@{k}"] = round(hits / n, 4)
    return out
