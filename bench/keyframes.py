"""Keyframe sampling vs uniform on real product photos: decode speed and clip R@1, one run.

Clips are made from the Grocery Store Dataset (https://github.com/marcusklasson/GroceryStoreDataset;
pass its folder as --root or $GROCERY_ROOT): each `val` photo filmed with a hand-held camera
(`tools.clipsynth.camera_motion_clip`: motion, zoom, roll, blur), --clip-frames frames at 30 fps
(5 s by default), written as MP4 (mp4v, a keyframe every 12 frames, as OpenCV writes it).

1. decode: every clip through `pipeline.decode.decode_clip` (uniform, 10 frames) and
   `pipeline.keyframes.decode_keyframes` (keyframes, up to 10), alternating, in this process on one
   thread, the fastest of --repeats per clip and mode; reports clips/s, source frames covered per
   second (clip frames / time) and the ratio;
2. R@1: the catalog images go into an in-process service (POST /v1/gallery/items), then every clip
   is recognised with sampling=uniform and sampling=keyframes (num_frames 10).

    PYTHONPATH=. .venv/bin/python bench/keyframes.py --root $GROCERY_ROOT [--limit 100] [--clip-frames 150]

Live-stream GOPs (issue 19): `--codec h264` (libx264, veryfast, 2 B-frames, no scene-cut keyframes)
or `--codec mpeg4` writes the clips with PyAV as a live encoder does, a keyframe every --gop-s
seconds at --fps, e.g. 20-s clips at 30 fps with a 2-s GOP:

    PYTHONPATH=. .venv/bin/python bench/keyframes.py --root $GROCERY_ROOT --codec h264 --fps 30 --gop-s 2 --clip-frames 600
"""

from __future__ import annotations

import argparse
import os
import time

import cv2
import numpy as np
from fastapi.testclient import TestClient

from model.checkpoint import load_encoder
from model.config import PreprocessConfig
from pipeline.decode import DecodeLimits, decode_clip
from pipeline.keyframes import decode_keyframes
from service.app import create_app
from service.settings import Settings
from tools.clipsynth import camera_motion_clip, encode_video
from train.grocery import read_grocery


def encode_live(frames: list[np.ndarray], fps: float, gop_s: float, codec: str) -> bytes:
    """BGR frames -> MP4 bytes as a live encoder writes them: a keyframe exactly every gop_s seconds
    (closed GOPs, no extra keyframes at scene cuts), H.264 (libx264) or MPEG-4 Part 2."""
    import io

    import av

    gop = max(1, round(gop_s * fps))
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        name = "libx264" if codec == "h264" else "mpeg4"
        opts = {"preset": "veryfast", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=2"} if name == "libx264" else {}
        stream = out.add_stream(name, rate=round(fps), options=opts)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        if name == "mpeg4":
            stream.codec_context.bit_rate = 2_000_000
            stream.codec_context.options = {"sc_threshold": "1000000000"}  # keyframes on the GOP grid only
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="bgr24")))
        out.mux(stream.encode(None))
    return buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.environ.get("GROCERY_ROOT"), help="Grocery Store Dataset folder (default $GROCERY_ROOT)")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=100, help="photos (clips) used, spread over the split")
    p.add_argument("--clip-frames", type=int, default=150)
    p.add_argument("--size", type=int, default=384, help="clip width and height")
    p.add_argument("--num-frames", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="decodes per clip and mode; the fastest counts")
    p.add_argument("--codec", choices=["mp4v", "h264", "mpeg4"], default="mp4v", help="mp4v: OpenCV's writer; else PyAV, live GOPs")
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--gop-s", type=float, default=2.0, help="seconds between keyframes (h264, mpeg4)")
    args = p.parse_args()
    if not args.root:
        p.error("give --root or set GROCERY_ROOT")
    data = read_grocery(args.root)
    photos = data.photos(args.split)
    photos = [photos[i] for i in np.linspace(0, len(photos) - 1, min(args.limit, len(photos))).round().astype(int)]
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    clips = []
    for ph in photos:
        image = cv2.imread(str(ph.path))
        if image is None:
            raise SystemExit(f"unreadable photo: {ph.path}")
        shots = camera_motion_clip(image, rng, num_frames=args.clip_frames, out_size=(args.size, args.size))
        live = args.codec != "mp4v"
        clips.append(encode_live(shots, args.fps, args.gop_s, args.codec) if live else encode_video(shots, fps=args.fps))
    gop = f", {args.codec}, a keyframe every {args.gop_s:g} s" if args.codec != "mp4v" else ", mp4v (OpenCV)"
    print(
        f"{len(clips)} clips of {args.clip_frames} frames at {args.fps:g} fps ({args.size}x{args.size}{gop}), "
        f"{sum(map(len, clips)) / len(clips) / 1e6:.2f} MB each, made in {time.perf_counter() - t:.0f} s"
    )

    pre, limits = PreprocessConfig(), DecodeLimits()
    seconds = {"uniform": 0.0, "keyframes": 0.0}
    used = {"uniform": 0, "keyframes": 0}
    for data_ in clips:  # alternate the modes clip by clip: the machine's load hits both alike
        for mode, fn in (("uniform", decode_clip), ("keyframes", decode_keyframes)):
            best = float("inf")
            for _ in range(args.repeats):  # the fastest of a few: load spikes on a shared machine are noise
                t = time.perf_counter()
                frames = len(fn(data_, args.num_frames, pre, limits).frames)
                best = min(best, time.perf_counter() - t)
            used[mode] += frames
            seconds[mode] += best

    settings = Settings(gallery_path=":memory:")
    recall: dict[str, float] = {}
    with TestClient(create_app(settings, encoder=load_encoder(None))) as client:
        for prod in data.products:
            r = client.post("/v1/gallery/items", files={"image": ("c.jpg", prod.catalog_image.read_bytes())}, data={"sku": prod.sku})
            r.raise_for_status()
        for mode in ("uniform", "keyframes"):
            hits = 0
            for ph, clip in zip(photos, clips, strict=True):
                params: dict[str, str | int] = {"top_k": 1, "num_frames": args.num_frames, "sampling": mode}
                r = client.post("/v1/recognize", params=params, files={"file": ("c.mp4", clip)})
                r.raise_for_status()
                hits += r.json()["results"][0]["sku"] == ph.sku
            recall[mode] = hits / len(clips)

    n = len(clips)
    print(f"| mode | clips/s decoded | source frames/s | frames used per clip | clip R@1 ({n} clips, {len(data.products)} products) |")
    print("|---|---|---|---|---|")
    for mode in ("uniform", "keyframes"):
        rate = n * args.clip_frames / seconds[mode]
        print(f"| {mode} | {n / seconds[mode]:.1f} | {rate:,.0f} | {used[mode] / n:.1f} | {recall[mode]:.3f} |")
    print(
        f"keyframes vs uniform: {seconds['uniform'] / seconds['keyframes']:.2f}x faster decode, "
        f"R@1 {100 * (recall['keyframes'] - recall['uniform']):+.1f} points"
    )


if __name__ == "__main__":
    main()
