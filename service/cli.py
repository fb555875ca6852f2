"""The `rice` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from service.settings import Settings


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    values = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**values)  # type: ignore[arg-type]


def cmd_serve(args: argparse.Namespace) -> int:
    from service.server import serve

    serve(_settings(args, checkpoint=args.checkpoint, host=args.host, port=args.port, gallery_path=args.gallery_path))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from service.demo import run_demo

    out = Path(args.out)
    settings = _settings(args, checkpoint=args.checkpoint, port=args.port, gallery_path=str(out / "gallery.db"))
    share = run_demo(settings, out, args.products, args.clips_per_product, args.top_k, args.seed)
    return 0 if share >= args.min_top1 else 1


def cmd_grocery_check(args: argparse.Namespace) -> int:
    from service.grocery_check import run_grocery_check

    report = run_grocery_check(args.data, args.checkpoint, args.split, num_frames=args.num_frames, seed=args.seed)
    print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rice", description="Livestream product recognition (RICE): serve, demo, evaluate.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the HTTP service (settings from RICE_* environment variables; flags override)")
    s.add_argument("--checkpoint", help="RICE checkpoint to serve (default: ImageNet EfficientNet-Lite0)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--gallery-path", help="embedded SQLite gallery file")
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="serve on localhost, ingest a generated catalog, recognise generated clips")
    d.add_argument("--out", default="demo_out", help="where the generated catalog, clips and gallery go")
    d.add_argument("--products", type=int, default=12)
    d.add_argument("--clips-per-product", type=int, default=2)
    d.add_argument("--top-k", type=int, default=3)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--port", type=int, default=0, help="0 = any free port")
    d.add_argument("--checkpoint")
    d.add_argument("--min-top1", type=float, default=0.0, help="exit non-zero if fewer clips than this share rank right first")
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("grocery-check", help="real-data check: R@1/5/10 of clips built from a grocery-layout folder")
    g.add_argument("--data", required=True, help="folder laid out like the Grocery Store Dataset subset")
    g.add_argument("--checkpoint")
    g.add_argument("--split", default="val")
    g.add_argument("--num-frames", type=int, default=10)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_grocery_check)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2"):  # one line per request drowns the demo's table
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
