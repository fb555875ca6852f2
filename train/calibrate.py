"""Open-set calibration: from the top-1 scores of clips whose product is in the gallery ("present")
and of clips whose product is not ("absent"), pick the score from which an answer is a match.

Pure numpy. `pick_threshold` chooses the lowest threshold at which the answers called a match are
present clips with at least the target precision, weighting present and absent clips to a stated
absent share (so the threshold does not depend on how many of each the held-out set happened to
have). The lowest such threshold keeps as many present clips as the precision allows.

`python -m train.calibrate --scores REPORT.json --precision 0.9 --checkpoint CKPT` stores the
threshold in the checkpoint (field `match_threshold`), where the service reads it from;
`--verdict VERDICT.json` (from `rice livebench --fit-verdict`) stores the verdict model too (field
`verdict`), which then gives `match_probability` for that checkpoint.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Calibration:
    threshold: float
    precision: float  # weighted precision of "match" answers at the threshold
    present_accepted: float  # share of present clips called a match (recall)
    absent_rejected: float  # share of absent clips called "none of these"
    target_precision: float
    absent_share: float
    present: int
    absent: int


def auroc(present: np.ndarray, absent: np.ndarray) -> float:
    """Area under the ROC curve of score as a present-vs-absent detector (Mann-Whitney U; ties count 1/2)."""
    p, a = np.asarray(present, np.float64), np.asarray(absent, np.float64)
    if len(p) == 0 or len(a) == 0:
        raise ValueError("auroc needs at least one present and one absent score")
    scores = np.concatenate([p, a])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks over ties
        tied = scores == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    u = ranks[: len(p)].sum() - len(p) * (len(p) + 1) / 2
    return float(u / (len(p) * len(a)))


def rates_at(present: np.ndarray, absent: np.ndarray, threshold: float, absent_share: float = 0.5) -> tuple[float, float, float]:
    """(weighted precision, present accepted, absent rejected) of the rule score >= threshold."""
    p, a = np.asarray(present, np.float64), np.asarray(absent, np.float64)
    tpr = float((p >= threshold).mean()) if len(p) else 0.0
    fpr = float((a >= threshold).mean()) if len(a) else 0.0
    accepted = (1 - absent_share) * tpr + absent_share * fpr
    precision = (1 - absent_share) * tpr / accepted if accepted > 0 else 1.0
    return precision, tpr, 1.0 - fpr


def pick_threshold(present: np.ndarray, absent: np.ndarray, target_precision: float = 0.9, absent_share: float = 0.5) -> Calibration:
    """The lowest threshold whose match answers reach `target_precision` (present clips among them,
    present and absent weighted to `absent_share`). When no threshold reaches it, the one with the
    best precision (ties: the lowest). Raises ValueError without both kinds of scores."""
    p, a = np.asarray(present, np.float64), np.asarray(absent, np.float64)
    if len(p) == 0 or len(a) == 0:
        raise ValueError("calibration needs at least one present and one absent score")
    if not 0 < target_precision <= 1 or not 0 < absent_share < 1:
        raise ValueError("target_precision must be in (0, 1] and absent_share in (0, 1)")
    # Only observed present scores are worth trying: between two of them precision can only drop.
    candidates = np.unique(p)  # ascending
    rows = [rates_at(p, a, float(t), absent_share) for t in candidates]
    precisions = np.array([r[0] for r in rows])
    ok = np.flatnonzero(precisions >= target_precision)
    best = int(ok[0]) if len(ok) else int(np.flatnonzero(precisions == precisions.max())[0])
    # Halfway down to the highest absent score below it: the same decisions on this data, a margin on new data.
    below = a[a < candidates[best]]
    threshold = float(candidates[best]) if len(below) == 0 else float((candidates[best] + below.max()) / 2)
    precision, tpr, tnr = rates_at(p, a, threshold, absent_share)
    return Calibration(round(threshold, 6), precision, tpr, tnr, target_precision, absent_share, len(p), len(a))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", help="JSON with 'present' and 'absent' top-1 score lists (a livebench report)")
    parser.add_argument("--precision", type=float, default=0.9, help="target precision of match answers")
    parser.add_argument("--absent-share", type=float, default=0.5, help="share of queries assumed to show no catalog product")
    parser.add_argument("--checkpoint", help="store the threshold in this checkpoint (field match_threshold)")
    parser.add_argument("--verdict", help="also store this verdict model (`rice livebench --fit-verdict` JSON) in the checkpoint")
    args = parser.parse_args()
    if args.verdict:
        if not args.checkpoint:
            parser.error("--verdict needs --checkpoint")
        from model.checkpoint import set_checkpoint_fields
        from model.verdict import VerdictModel

        text = Path(args.verdict).read_text()
        VerdictModel.from_json(text)  # refuse to store what the service could not read
        set_checkpoint_fields(args.checkpoint, {"verdict": text})
        if not args.scores:
            return
    if not args.scores:
        parser.error("--scores is required (or --verdict with --checkpoint)")
    report = json.loads(Path(args.scores).read_text())
    scores = report.get("open_set_scores", report)
    cal = pick_threshold(np.array(scores["present"]), np.array(scores["absent"]), args.precision, args.absent_share)
    if args.checkpoint:
        from model.checkpoint import set_checkpoint_fields

        set_checkpoint_fields(args.checkpoint, {"match_threshold": cal.threshold, "match_calibration": asdict(cal)})
    print(json.dumps(asdict(cal), indent=2))


if __name__ == "__main__":
    main()
