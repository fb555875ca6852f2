"""Generated long livestream recordings with known segments, for timeline tests and evaluation.

A recording is a list of parts: a gallery product held up to the camera, the room with nothing
held up (a gap), or a distractor (a product the shop does not sell, which must come back as no
product). `plan_recording` draws a livestream-like schedule (products in turn, gaps, products that
come back later, distractors); `write_recording` renders it with the demo catalog's generators
and writes it to disk frame chunk by frame chunk, so even hours of video never sit in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tools.democatalog import DemoProduct, render_clip, render_room_clip

_CHUNK_S = 8.0  # a long part is rendered as several clips: the seller keeps moving the product


@dataclass(frozen=True)
class Part:
    """`seconds` of the recording showing `sku` (None: no gallery product on screen). A distractor
    part shows `shown`, a product missing from the gallery, while its truth stays None."""

    sku: str | None
    seconds: float
    shown: str | None = None


@dataclass(frozen=True)
class TruthSegment:
    start_s: float
    end_s: float
    sku: str | None


def plan_recording(
    skus: Sequence[str], distractors: Sequence[str], total_s: float, rng: np.random.Generator, product_s: tuple[float, float] = (8, 24)
) -> list[Part]:
    """A schedule of about `total_s` seconds: each gallery product in turn (shuffled), then some
    again; a gap after about 40% of products, a distractor after about 15%; never the same
    product twice in a row."""
    parts: list[Part] = []
    order = list(rng.permutation(len(skus)))
    seen: list[int] = []
    elapsed = 0.0
    while elapsed < total_s:
        if order:
            i = int(order.pop())
        else:  # everything shown once: products come back
            choices = [j for j in range(len(skus)) if not parts or skus[j] != parts[-1].sku] or list(range(len(skus)))
            i = int(rng.choice(choices))
        if parts and parts[-1].sku == skus[i]:
            parts.append(Part(None, float(rng.uniform(3, 6))))
        parts.append(Part(skus[i], float(rng.uniform(*product_s))))
        seen.append(i)
        if rng.random() < 0.4:
            parts.append(Part(None, float(rng.uniform(3, 8))))
        if distractors and rng.random() < 0.15:
            parts.append(Part(None, float(rng.uniform(4, 8)), shown=str(rng.choice(list(distractors)))))
        elapsed = sum(p.seconds for p in parts)
    return parts


def truth_of(parts: Sequence[Part], fps: float) -> list[TruthSegment]:
    """The true segments, at the frame times the recording really has (frame counts round), with
    adjacent parts of the same truth (a gap next to a distractor) merged."""
    out: list[TruthSegment] = []
    frame = 0
    for p in parts:
        n = max(1, round(p.seconds * fps))
        start, end = frame / fps, (frame + n) / fps
        frame += n
        if out and out[-1].sku == p.sku:
            out[-1] = TruthSegment(out[-1].start_s, end, p.sku)
        else:
            out.append(TruthSegment(start, end, p.sku))
    return out


def write_recording(
    parts: Sequence[Part],
    products: Sequence[DemoProduct],
    path: str | os.PathLike[str],
    seed: int = 0,
    fps: float = 10.0,
    size: tuple[int, int] = (320, 240),
    render_size: tuple[int, int] = (320, 240),
    scale: tuple[float, float] = (0.8, 0.95),
    occlusion: bool = False,
    on_part: Callable[[int], object] = lambda i: None,
) -> list[TruthSegment]:
    """Render `parts` into an MP4 (mp4v) at `path`; returns the true segments.

    Frames are drawn at `render_size` and scaled to `size`, so a 1080p recording costs the
    encoder and decoder what real 1080p costs without drawing every pixel. `scale` is the
    product's height as a share of the frame (a seller holding it up to the camera: about 0.8);
    `occlusion` draws a hand gripping it."""
    by_sku = {p.sku: p for p in products}
    rng = np.random.default_rng(seed)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter.fourcc(*"mp4v"), float(fps), size)
    if not writer.isOpened():
        raise RuntimeError(f"cv2.VideoWriter could not open {out}")
    try:
        for i, part in enumerate(parts):
            left = max(1, round(part.seconds * fps))
            while left > 0:
                n = min(left, max(1, round(_CHUNK_S * fps)))
                left -= n
                shown = part.shown or part.sku
                if shown is None:
                    frames = render_room_clip(rng, n, render_size)
                else:
                    frames = render_clip(by_sku[shown], rng, num_frames=n, size=render_size, occlusion=occlusion, scale=scale)
                for f in frames:
                    writer.write(f if render_size == size else cv2.resize(f, size, interpolation=cv2.INTER_LINEAR))
            on_part(i)
    finally:
        writer.release()
    return truth_of(parts, fps)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tools.longclip OUT.mp4`: one generated recording and its true segments (OUT.json)."""
    import argparse
    import json
    from dataclasses import asdict

    from tools.democatalog import make_products
    from tools.helpfmt import ShowDefaults

    p = argparse.ArgumentParser(
        prog="python -m tools.longclip",
        description="Write a generated livestream recording (products held up in turn, gaps, distractors) and, beside it, "
        "its true segments as JSON: test material for `rice timeline` and POST /v1/jobs/timeline. "
        "Products are drawn by the demo catalog's generator, make_products(--products + --distractors, --seed): their SKU "
        "names are the demo's, but the designs depend on the count, so only --products 12 --distractors 0 --seed 0 films "
        "exactly the catalog `rice demo` ingests (the defaults film other products under the same names).",
        formatter_class=ShowDefaults,
    )
    p.add_argument("out", help="the MP4 to write; the truth goes to the same name with .json")
    p.add_argument("--seconds", type=float, default=120.0, help="about how long the recording is")
    p.add_argument("--products", type=int, default=8, help="gallery products shown (the demo catalog's generator)")
    p.add_argument("--distractors", type=int, default=2, help="products shown that are not in the gallery")
    p.add_argument("--fps", type=float, default=10.0, help="frames per second of the recording")
    p.add_argument("--seed", type=int, default=0, help="the products and the schedule (the same seed, the same recording)")
    args = p.parse_args(argv)
    products = make_products(args.products + args.distractors, seed=args.seed)
    shown, others = products[: args.products], products[args.products :]
    rng = np.random.default_rng(args.seed)
    parts = plan_recording([q.sku for q in shown], [q.sku for q in others], args.seconds, rng)
    truth = write_recording(parts, products, args.out, seed=args.seed, fps=args.fps)
    truth_path = Path(args.out).with_suffix(".json")
    truth_path.write_text(json.dumps({"skus": [q.sku for q in shown], "segments": [asdict(t) for t in truth]}, indent=2) + "\n")
    print(f"{args.out}: {sum(q.seconds for q in parts):.0f} s, {len(truth)} true segments in {truth_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
