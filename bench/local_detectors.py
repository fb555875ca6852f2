"""Which local features verify a product: SIFT (RootSIFT) vs ORB vs AKAZE at an equal storage budget.

Each product's catalog (iconic) image gets as many keypoints as fit about 40 KB per item (SIFT 300 x
132 B, AKAZE 600 x 65 B, ORB 1100 x 36 B; sift600 spends twice the budget); each query is a grocery photo (every `--every`-th of a split)
shrunk to a long side of `--side` pixels with up to 1000 keypoints; it is matched against every
catalog image (ratio test 0.8, RANSAC homography) and the products are ranked by inlier count.
Reports R@1 per product group (packaged, fresh) and the time per match.

    python -m bench.local_detectors --data $GROCERY_ROOT --every 4
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import cv2
import numpy as np

from train.data import read_image
from train.grocery import read_grocery

# keypoints per catalog image: ~40 KB stored (sift600: twice the budget, to see what it costs)
BUDGET = {"sift": 300, "sift600": 600, "akaze": 600, "orb": 1100}


def _detector(name: str, n: int) -> Any:
    if name.startswith("sift"):
        return cv2.SIFT_create(nfeatures=n)
    if name == "orb":
        return cv2.ORB_create(nfeatures=n)
    if not hasattr(cv2, "AKAZE_create"):  # OpenCV 5 moved AKAZE to the contrib modules
        raise SystemExit("this OpenCV build has no AKAZE")
    return cv2.AKAZE_create(threshold=0.0005)


def _features(name: str, bgr: np.ndarray, n: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    s = side / max(gray.shape)
    gray = cv2.resize(gray, None, fx=s, fy=s, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    kps, desc = _detector(name, n).detectAndCompute(gray, None)
    if desc is None:
        return np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)
    order = np.argsort([-k.response for k in kps])[:n]
    pts = np.array([kps[i].pt for i in order], np.float32)
    d = desc[order]
    if name.startswith("sift"):  # RootSIFT
        d = np.sqrt(d / np.maximum(d.sum(1, keepdims=True), 1e-7)).astype(np.float32)
    return pts, d


def _inliers(name: str, q: tuple[np.ndarray, np.ndarray], c: tuple[np.ndarray, np.ndarray]) -> int:
    if len(q[0]) < 2 or len(c[0]) < 8:
        return 0
    norm = cv2.NORM_L2 if name.startswith("sift") else cv2.NORM_HAMMING
    pairs = cv2.BFMatcher(norm).knnMatch(c[1], q[1], k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < 0.8 * p[1].distance]
    if len(good) < 8:
        return 0
    src = c[0][[m.queryIdx for m in good]].reshape(-1, 1, 2)
    dst = q[0][[m.trainIdx for m in good]].reshape(-1, 1, 2)
    h, mask = cv2.findHomography(src, dst, cv2.RANSAC, 6.0, maxIters=500)
    return 0 if h is None or mask is None else int(mask.sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--side", type=int, default=480, help="query long side in pixels")
    p.add_argument("--detectors", default="sift,sift600,orb", help="of sift, sift600, orb, akaze (needs OpenCV with AKAZE)")
    args = p.parse_args()
    cv2.setNumThreads(1)
    data = read_grocery(args.data)
    group = {pr.sku: ("packaged" if pr.packaged else "fresh") for pr in data.products}
    photos = data.photos(args.split)[:: args.every]
    report: dict[str, Any] = {"queries": len(photos), "products": len(data.products), "side": args.side}
    for name in args.detectors.split(","):
        n = BUDGET[name]
        catalog = {pr.sku: _features(name, read_image(pr.catalog_image), n, 400) for pr in data.products}
        hits: dict[str, list[bool]] = {"packaged": [], "fresh": []}
        right, best_wrong = [], []
        t_match, n_match = 0.0, 0
        for ph in photos:
            q = _features(name, read_image(ph.path), 1000, args.side)
            t = time.perf_counter()
            scores = {sku: _inliers(name, q, c) for sku, c in catalog.items()}
            t_match += time.perf_counter() - t
            n_match += len(catalog)
            top = max(scores, key=lambda s: scores[s])
            hits[group[ph.sku]].append(top == ph.sku and scores[top] > 0)
            if group[ph.sku] == "packaged":
                right.append(scores[ph.sku])
                best_wrong.append(max(v for s, v in scores.items() if s != ph.sku))
        report[name] = {
            "catalog_keypoints": n,
            "r1_packaged": round(float(np.mean(hits["packaged"])), 3),
            "r1_fresh": round(float(np.mean(hits["fresh"])), 3),
            "median_inliers_right_packaged": float(np.median(right)) if right else None,
            "median_inliers_best_wrong_packaged": float(np.median(best_wrong)) if best_wrong else None,
            "ms_per_match": round(t_match / max(n_match, 1) * 1e3, 2),
        }
        print(json.dumps({name: report[name]}), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
