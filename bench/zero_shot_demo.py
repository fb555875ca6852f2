"""How often the served encoder ranks the right SKU first on generated close-up clips, over many
generated catalogs (the decode -> encode -> clip embedding -> search path, in process).

    .venv/bin/python bench/zero_shot_demo.py --catalogs 6 --products 8 [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from model.checkpoint import load_encoder
from model.preprocess import prepare_frame
from pipeline.decode import DecodeLimits, decode_clip
from pipeline.engine import EncoderEngine
from pipeline.stages import clip_vector
from tools.clipsynth import encode_video
from tools.democatalog import make_products, render_clip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalogs", type=int, default=6)
    ap.add_argument("--products", type=int, default=8)
    ap.add_argument("--checkpoint")
    ap.add_argument("--occlusion", action="store_true")
    args = ap.parse_args()
    # The service's own path: EncoderEngine embeds, clip_vector pools, as POST /v1/recognize does.
    engine = EncoderEngine(load_encoder(args.checkpoint), "cpu")
    pre = engine.config.preprocess

    report = {}
    for scale in [(0.4, 0.65), (0.6, 0.9), (0.8, 0.95)]:
        hits = []
        for seed in range(args.catalogs):
            products = make_products(args.products, seed=seed)
            gallery = engine.encode(np.stack([prepare_frame(p.image, pre, whole=True) for p in products]))
            for i, p in enumerate(products):
                clip = encode_video(render_clip(p, np.random.default_rng(i), num_frames=20, scale=scale, occlusion=args.occlusion))
                query = clip_vector(engine.encode(decode_clip(clip, 10, pre, DecodeLimits()).frames))
                hits.append(int((gallery @ query).argmax()) == i)
        report[f"height {scale[0]:.2f}-{scale[1]:.2f}"] = {"clips": len(hits), "top1": round(float(np.mean(hits)), 3)}
    print(json.dumps({"model_version": engine.model_version, "occlusion": args.occlusion, "results": report}, indent=2))


if __name__ == "__main__":
    main()
