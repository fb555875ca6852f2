"""The verdict: is the top answer the product shown, or "none of these"? One probability from several signals.

The raw top-1 cosine score barely separates a present product from an absent one in livestream
conditions (AUROC about 0.5 on `rice livebench`). The evidence that does is relative and geometric:
how far the top SKU stands out from the rest of the top-k, its margin over the runner-up, how many
RANSAC inliers its catalog image has in the frames (and how many more than the runner-up's), how much
of the catalog image they cover, and whether several frames agree. A logistic regression over those
signals (fitted here with IRLS, numpy only, on calibration clips that include absent products) turns
them into `match_probability`; the served threshold on it is picked for a target precision with
`train.calibrate.pick_threshold`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SIGNALS = (
    "embedding_score",  # top-1 SKU's embedding (cosine) score
    "embedding_margin",  # ... minus the best other candidate's
    "standout",  # top-1 embedding score in standard deviations above the other candidates'
    "log_inliers",  # log(1 + RANSAC inliers) of the top-1 SKU (0 without local features)
    "inlier_margin",  # ... minus that of the best other candidate
    "coverage",  # share of the top-1 catalog image's keypoint cells holding an inlier
    "agreement",  # share of the verified frames in which the top-1 SKU has a homography
    "verifiable",  # 1 when the top-1 SKU has usable local features (not featureless, not bulk-imported)
)


@dataclass(frozen=True)
class Candidate:
    """What verification knows about one SKU of the top-k (already in the final rank order)."""

    embedding_score: float
    inliers: int = 0
    coverage: float = 0.0
    agreement: float = 0.0
    verifiable: bool = False


def signals(candidates: list[Candidate]) -> np.ndarray:
    """Ranked candidates (best first) -> float64 [len(SIGNALS)]; zeros for an empty list."""
    if not candidates:
        return np.zeros(len(SIGNALS))
    top, rest = candidates[0], candidates[1:]
    emb_rest = np.array([c.embedding_score for c in rest]) if rest else np.array([top.embedding_score])
    inl_rest = max((c.inliers for c in rest), default=0)
    standout = (top.embedding_score - emb_rest.mean()) / (emb_rest.std() + 0.02)  # floor: a flat top-k is not a standout
    return np.array(
        [
            top.embedding_score,
            top.embedding_score - emb_rest.max(),
            standout,
            np.log1p(top.inliers),
            np.log1p(top.inliers) - np.log1p(inl_rest),
            top.coverage,
            top.agreement,
            float(top.verifiable),
        ]
    )


@dataclass(frozen=True)
class VerdictModel:
    """Logistic regression on standardised signals: p = sigmoid(coef . (x - mean) / scale + intercept)."""

    coef: tuple[float, ...]
    intercept: float
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    threshold: float = 0.5  # the served probability threshold (for a target precision on the calibration set)
    signals: tuple[str, ...] = SIGNALS

    def probability(self, x: np.ndarray) -> np.ndarray:
        """Signals [..., S] -> probabilities [...] in (0, 1)."""
        z = (np.asarray(x, np.float64) - np.array(self.mean)) / np.array(self.scale)
        return 1.0 / (1.0 + np.exp(-np.clip(z @ np.array(self.coef) + self.intercept, -30, 30)))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @staticmethod
    def from_json(text: str) -> VerdictModel:
        d = json.loads(text)
        model = VerdictModel(
            tuple(map(float, d["coef"])),
            float(d["intercept"]),
            tuple(map(float, d["mean"])),
            tuple(map(float, d["scale"])),
            float(d.get("threshold", 0.5)),
            tuple(d.get("signals", SIGNALS)),
        )
        if model.signals != SIGNALS or not (len(model.coef) == len(model.mean) == len(model.scale) == len(SIGNALS)):
            raise ValueError(f"verdict model is for signals {model.signals}, this code computes {SIGNALS}")
        return model


def fit(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iterations: int = 50) -> VerdictModel:
    """Signals [N, S], labels [N] (1 = the top-1 answer is the right product) -> a fitted model
    (IRLS / Newton steps with an L2 penalty on the coefficients, not the intercept)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-9] = 1.0  # a constant signal (e.g. no verification in the run) carries no weight
    z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -30, 30)))
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return VerdictModel(tuple(w[:-1].tolist()), float(w[-1]), tuple(mean.tolist()), tuple(scale.tolist()))


# The built-in encoder's verdict (fitted with `rice livebench --fit-verdict`, docs/RESULTS.md, issue 23).
BUILTIN_PATH = Path(__file__).with_name("verdict_builtin.json")


def builtin_verdict() -> VerdictModel | None:
    """The verdict model shipped for the built-in encoder, or None when there is none."""
    return VerdictModel.from_json(BUILTIN_PATH.read_text()) if BUILTIN_PATH.is_file() else None
