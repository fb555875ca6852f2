"""Local features for instance-level verification: SIFT keypoints, stored compactly, matched with
RootSIFT, a ratio test and a RANSAC homography.

A global embedding says "a carton of juice"; keypoints on the print say "this carton". A catalog
image's features are extracted once at ingestion (from the full-resolution upload), serialised to
a few tens of KB (`to_bytes`: a small header and raw arrays, never pickle) and stored beside the
item's thumbnail; a query frame's features are extracted once per request and matched against the
top SKUs' catalog features (`match`). SIFT was picked over ORB and AKAZE by measurement on the grocery
photos at an equal storage budget (docs/RESULTS.md, issue 23).

OpenCV releases the GIL in detection, matching and RANSAC: callers run these on a thread pool.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import cv2
import numpy as np

# Catalog images: at most this many keypoints (the strongest), 132 bytes each (128 uint8 descriptor
# values + two float16 coordinates): 300 -> 39.6 KB + header, within the 40 KB budget per item.
MAX_CATALOG_FEATURES = 300
MAX_FEATURE_BYTES = 40 * 1024
# Query frames: more keypoints (they are never stored), the product may cover a fraction of the frame.
MAX_QUERY_FEATURES = 1000
# Images are detected at this long side at most (larger uploads are shrunk: a product's print does
# not need more, and detection cost grows with the pixels); smaller catalog images are upscaled to it.
DETECT_SIDE = 640
MIN_CATALOG_SIDE = 400
# Fewer keypoints than this on a catalog image: "featureless" (a plain apple); verification cannot
# speak for it and the verdict relies on the embedding.
MIN_FEATURES = 40

_MAGIC = b"RLF1"
_HEADER = struct.Struct("<4sHHHH")  # magic, count, width, height, descriptor length (bytes)
_DESC_LEN = 128


@dataclass(frozen=True)
class LocalFeatures:
    """Keypoints and SIFT descriptors of one image, in the coordinates of that image as given."""

    points: np.ndarray  # float32 [N, 2], (x, y) pixels
    descriptors: np.ndarray  # uint8 [N, 128], OpenCV SIFT (integer-valued already: lossless as uint8)
    width: int
    height: int

    def __len__(self) -> int:
        return int(self.points.shape[0])

    @property
    def featureless(self) -> bool:
        return len(self) < MIN_FEATURES

    def to_bytes(self) -> bytes:
        """Header + float16 points [N, 2] + uint8 descriptors [N, 128], little-endian."""
        head = _HEADER.pack(_MAGIC, len(self), self.width, self.height, _DESC_LEN)
        return head + self.points.astype("<f2").tobytes() + np.ascontiguousarray(self.descriptors, np.uint8).tobytes()

    @staticmethod
    def from_bytes(data: bytes) -> LocalFeatures:
        """The inverse of `to_bytes`; ValueError on anything else (stores are shared: check, never trust)."""
        if len(data) < _HEADER.size:
            raise ValueError("local features: truncated header")
        magic, n, w, h, d = _HEADER.unpack_from(data)
        if magic != _MAGIC or d != _DESC_LEN:
            raise ValueError("local features: not RLF1 data")
        if len(data) != _HEADER.size + n * (4 + d):
            raise ValueError(f"local features: {len(data)} bytes for {n} keypoints")
        off = _HEADER.size
        points = np.frombuffer(data, "<f2", n * 2, off).reshape(n, 2).astype(np.float32)
        desc = np.frombuffer(data, np.uint8, n * d, off + n * 4).reshape(n, d).copy()
        return LocalFeatures(points, desc, int(w), int(h))


def _detector(n: int) -> cv2.SIFT:
    # A SIFT object is cheap to make and not documented as thread-safe: one per call.
    return cv2.SIFT_create(nfeatures=n)  # type: ignore[attr-defined]  # stubs lack it in OpenCV 5


def _gray(image_rgb: np.ndarray, max_side: int, min_side: int) -> tuple[np.ndarray, float]:
    """RGB (or grey) uint8 [H, W(, 3)] -> grey at a long side within [min_side, max_side], and the scale applied."""
    gray = image_rgb if image_rgb.ndim == 2 else cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)
    side = max(gray.shape[:2])
    scale = min(1.0, max_side / side) if side >= min_side else min_side / side
    if scale != 1.0:
        size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return gray, scale


def extract(image_rgb: np.ndarray, max_features: int = MAX_QUERY_FEATURES, max_side: int = DETECT_SIDE, min_side: int = 0) -> LocalFeatures:
    """The strongest `max_features` SIFT keypoints of an image; points are in the input's pixels."""
    gray, scale = _gray(image_rgb, max_side, min_side)
    kps, desc = _detector(max_features).detectAndCompute(gray, None)
    h, w = image_rgb.shape[:2]
    if desc is None or not kps:
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, _DESC_LEN), np.uint8), w, h)
    order = np.argsort([-k.response for k in kps])[:max_features]  # nfeatures can keep ties past the cap
    points = np.array([kps[i].pt for i in order], np.float32) / scale
    return LocalFeatures(points, np.clip(desc[order], 0, 255).astype(np.uint8), w, h)


def extract_catalog(image_rgb: np.ndarray) -> LocalFeatures:
    """Catalog image -> at most MAX_CATALOG_FEATURES keypoints (fits MAX_FEATURE_BYTES serialised)."""
    return extract(image_rgb, MAX_CATALOG_FEATURES, DETECT_SIDE, MIN_CATALOG_SIDE)


def root_sift(desc: np.ndarray) -> np.ndarray:
    """uint8 SIFT [N, 128] -> RootSIFT float32 [N, 128] (L1-normalise, square root: Hellinger kernel
    as a Euclidean distance, Arandjelovic and Zisserman 2012)."""
    d = desc.astype(np.float32)
    d /= np.maximum(d.sum(axis=1, keepdims=True), 1e-7)
    return np.sqrt(d)


@dataclass(frozen=True)
class Match:
    """Geometric evidence that a catalog image appears in a query frame."""

    inliers: int  # RANSAC inliers of the homography catalog -> frame
    matches: int  # tentative matches that passed the ratio test
    coverage: float  # share of the catalog's keypoint-bearing grid cells (8x8) holding an inlier
    homography: np.ndarray | None  # float64 [3, 3], catalog pixels -> query pixels; None without a model

    @property
    def inlier_ratio(self) -> float:
        return self.inliers / self.matches if self.matches else 0.0

    def box(self, width: int, height: int) -> list[list[float]]:
        """The catalog image's corners (its `width` x `height`) through the homography: [4, 2] in query pixels."""
        assert self.homography is not None
        corners = np.array([[[0, 0]], [[width, 0]], [[width, height]], [[0, height]]], np.float64)
        return [[round(float(x), 1), round(float(y), 1)] for x, y in cv2.perspectiveTransform(corners, self.homography)[:, 0]]


NO_MATCH = Match(0, 0, 0.0, None)
RATIO = 0.8  # Lowe's ratio test
RANSAC_PX = 6.0  # reprojection error in query pixels (frames of ~640 px, float16 catalog points)
MIN_INLIERS = 8  # below this a homography is chance: report no model


def _coverage(points: np.ndarray, inlier_points: np.ndarray, width: int, height: int, cells: int = 8) -> float:
    def occupied(p: np.ndarray) -> set[int]:
        gx = np.clip((p[:, 0] * cells / max(width, 1)).astype(int), 0, cells - 1)
        gy = np.clip((p[:, 1] * cells / max(height, 1)).astype(int), 0, cells - 1)
        return set((gy * cells + gx).tolist())

    return len(occupied(inlier_points)) / max(len(occupied(points)), 1)


def _plausible(h: np.ndarray, width: int, height: int) -> bool:
    """A homography a real product view could give: the catalog's corners stay a convex, non-flipped,
    not collapsed quadrilateral (RANSAC on a few chance matches yields twisted ones)."""
    corners = np.array([[[0, 0]], [[width, 0]], [[width, height]], [[0, height]]], np.float64)
    quad = cv2.perspectiveTransform(corners, h)[:, 0].astype(np.float32)
    area = cv2.contourArea(quad, oriented=True)
    return bool(np.isfinite(quad).all() and cv2.isContourConvex(quad) and area > 0 and abs(area) > 1e-3 * width * height)


def match(query: LocalFeatures, catalog: LocalFeatures, query_root: np.ndarray | None = None) -> Match:
    """Catalog features -> where (and how strongly) they appear in the query. `query_root`: the query's
    RootSIFT descriptors, when the caller matches one query against many catalog images."""
    if len(query) < 2 or len(catalog) < MIN_INLIERS:
        return NO_MATCH
    q = root_sift(query.descriptors) if query_root is None else query_root
    c = root_sift(catalog.descriptors)
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(c, q, k=2)  # catalog -> query: each catalog point at most once
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
    if len(good) < MIN_INLIERS:
        return Match(0, len(good), 0.0, None)
    src = catalog.points[[m.queryIdx for m in good]].reshape(-1, 1, 2)
    dst = query.points[[m.trainIdx for m in good]].reshape(-1, 1, 2)
    h, mask = cv2.findHomography(src, dst, cv2.RANSAC, RANSAC_PX, maxIters=500, confidence=0.99)
    if h is None or mask is None:
        return Match(0, len(good), 0.0, None)
    inl = mask.ravel().astype(bool)
    n = int(inl.sum())
    if n < MIN_INLIERS or not _plausible(h, catalog.width, catalog.height):
        return Match(0, len(good), 0.0, None)
    return Match(n, len(good), _coverage(catalog.points, src[inl, 0], catalog.width, catalog.height), h)
