"""The `rice` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from service.settings import Settings
from tools.helpfmt import show_defaults
from tools.recognize_batch import CSV_FIELDS

if TYPE_CHECKING:
    from tools.client import RiceClient

# Exit statuses: distinct per kind of failure, so scripts can tell them apart (see `rice --help`).
EXIT_OK, EXIT_FAILED_FILES, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_AUTH, EXIT_REJECTED, EXIT_SERVER = range(7)
EXIT_CODES = """exit status:
  0  done
  1  some files failed (each is listed); the others were done
  2  usage error: a bad flag, a missing file, an unreadable catalog
  3  cannot connect to the service
  4  the API key was refused (HTTP 401 or 403)
  5  the service rejected the request (another 4xx, e.g. a bad parameter or an unknown item)
  6  the service failed (5xx) or stayed overloaded (429/503) after the retries
"""


URL_HELP = "the service's base URL"
GROCERY_DATA = "https://github.com/marcusklasson/GroceryStoreDataset"


def _settings(**overrides: object) -> Settings:
    """Settings from RICE_* variables, with the flags the user gave (not None) on top."""
    values = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**values)  # type: ignore[arg-type]


def cmd_serve(args: argparse.Namespace) -> int:
    from service.startup import run

    # a bad setting, a busy port, no CUDA, no Redis: one line each and exit 2 (service.startup)
    return run("rice serve", checkpoint=args.checkpoint, host=args.host, port=args.port, gallery_path=args.gallery_path)


def cmd_demo(args: argparse.Namespace) -> int:
    from tools.demo import run_demo

    out = Path(args.out)
    settings = _settings(checkpoint=args.checkpoint, port=args.port, gallery_path=str(out / "gallery.db"))
    share = run_demo(settings, out, args.products, args.clips_per_product, args.top_k, args.seed)
    return 0 if share >= args.min_top1 else 1


def cmd_livebench(args: argparse.Namespace) -> int:
    from tools.livebench import run_from_args

    run_from_args(args)
    return 0


def cmd_grocery_check(args: argparse.Namespace) -> int:
    from tools.grocery_check import run_grocery_check

    overrides = dict(kv.split("=", 1) for kv in args.set)
    report = run_grocery_check(args.data, args.checkpoint, args.split, num_frames=args.num_frames, seed=args.seed, overrides=overrides)
    print(json.dumps(report, indent=2))
    return 0


def _journal_path(args: argparse.Namespace, source: Path, target: str, model_version: str) -> Path:
    """The ingest journal for this catalog, target and served model (galleries are per model)."""
    import hashlib

    if args.state:
        return Path(args.state)
    key = hashlib.sha1(f"{source.resolve()}|{target}|{model_version}".encode()).hexdigest()[:12]
    return Path(".rice-ingest") / f"{key}.jsonl"


def cmd_ingest(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tools.client import AuthError, RiceClient
    from tools.ingest import Journal, client_poster, ingest_client, read_catalog, run_ingest

    source = Path(args.source)
    items = read_catalog(source, args.shop_id)
    target = "in-process" if args.in_process else args.url
    with ingest_client(args.url, args.api_key, args.in_process) as http:
        client = RiceClient(args.url, args.api_key, http=http)
        info = client.info()  # also the connectivity check: no connection is one line, before any work
        model_version = str(info["model_version"])
        journal = Journal(_journal_path(args, source, target, model_version), namespace=model_version)
        try:
            with tqdm(total=len(items), unit="img", disable=args.quiet) as bar:
                bar.update(sum(it.item_id in journal.done for it in items))
                report = run_ingest(items, client_poster(client), journal, args.workers, bar.update, fatal=(AuthError,))
        except KeyboardInterrupt:
            print(f"interrupted; run the same command again to resume (journal: {journal.path})", file=sys.stderr)
            return 130
        finally:
            journal.close()
    summary = {**report.to_dict(), "model_version": model_version}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        counts = f"{report.ingested} ingested, {report.skipped} already done, {len(report.failed)} failed of {report.total}"
        print(f"{counts} for model {model_version} (journal: {journal.path})")
        for path, reason in sorted(report.failed.items()):
            print(f"  FAILED {path}: {reason}")
    return 1 if report.failed else 0


def cmd_reindex(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from tqdm import tqdm

    from index.blobs import open_originals
    from service.state import store_for
    from tools.ingest import read_catalog
    from tools.reindex import ReindexReport, run_reindex

    if args.embed_only:
        from tools.gallery_io import embed_to_dir

        if not args.catalog:
            print("rice reindex: --embed-only needs --catalog (it embeds a folder, not the gallery)", file=sys.stderr)
            return EXIT_USAGE
        summary = embed_to_dir(args.checkpoint, Path(args.catalog), args.shop_id, Path(args.embed_only), args.quiet)
        print(json.dumps(summary, indent=2))
        return 1 if summary["failed"] else 0
    settings = Settings()
    items = read_catalog(Path(args.catalog), args.shop_id) if args.catalog else []
    store = store_for(settings)

    def counts(report: ReindexReport) -> None:  # before any replica switches: what the new namespace holds
        print(f"rice reindex: {report.counts()}", file=sys.stderr, flush=True)

    try:
        with tqdm(unit="img", disable=args.quiet) as bar:

            def total(n: int) -> None:
                bar.total = n
                bar.refresh()

            report = run_reindex(
                args.checkpoint,
                items,
                store,
                settings,
                args.url,
                args.api_key,
                args.server_checkpoint,
                bar.update,
                originals=open_originals(settings.blob_dir, settings.gallery_path),
                on_counts=counts,
                allow_missing=args.allow_missing,
                on_total=total,
            )
    finally:
        store.close()
    print(json.dumps(asdict(report), indent=2))
    if report.not_switched:
        print(f"rice reindex: not switched: {report.not_switched}", file=sys.stderr)
    return 1 if report.failed else 0


def _empty_answer_reason(client: RiceClient, shop_id: str | None) -> str:
    """Why an answer can have no results: the gallery is empty (maybe the model-switch trap), or the
    shop asked for has no items; asked once, before the run."""
    gallery = client.info()["gallery"]
    if not gallery["items"]:
        return f"(empty gallery: {gallery['warning']})" if gallery.get("warning") else "(empty gallery: add items with `rice ingest`)"
    if shop_id is not None and client.list_items(shop_id=shop_id, limit=1).total == 0:
        return f"(shop {shop_id!r} has no items; the gallery holds {gallery['items']} items in {gallery['shops']} shops)"
    return "(no results)"


def cmd_recognize(args: argparse.Namespace) -> int:
    from tools import recognize_batch as batch
    from tools.client import AsyncRiceClient, RiceClient

    files = batch.media_files([Path(p) for p in args.paths])
    if not files:
        print("rice recognize: no clips or images found in " + ", ".join(args.paths), file=sys.stderr)
        return EXIT_USAGE
    with RiceClient(args.url, args.api_key) as client:
        reason = _empty_answer_reason(client, args.shop_id)  # also the connectivity check

    def show(o: batch.Outcome) -> None:  # each file as soon as it and those before it are done
        if args.csv:
            print(batch.csv_row(o), flush=True)
        elif not args.json:  # JSON is printed as one document at the end
            print(batch.table_line(o, lambda: reason, by_score=args.min_score is not None), flush=True)

    if args.csv:
        print(batch.csv_header(), flush=True)
    options = {"top_k": args.top_k, "shop_id": args.shop_id, "num_frames": args.num_frames, "min_score": args.min_score}
    client_async = AsyncRiceClient(args.url, args.api_key)
    outcomes = batch.run(client_async, files, args.concurrency, batch.InOrder(show), **options)
    if args.json:
        batch.print_json(outcomes)
    return 1 if any(o.error is not None for o in outcomes) else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rice",
        description="Livestream product recognition (RICE): serve, demo, evaluate.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the HTTP service (settings from RICE_* environment variables; flags override)")
    s.add_argument("--checkpoint", help="RICE checkpoint to serve (default: ImageNet EfficientNet-Lite0)")
    defaults = Settings.model_fields
    s.add_argument("--host", help=f"address to listen on (default: RICE_HOST, else {defaults['host'].default}; 0.0.0.0 = every interface)")
    s.add_argument("--port", type=int, help=f"port to listen on (default: RICE_PORT, else {defaults['port'].default})")
    s.add_argument(
        "--gallery-path", help=f"embedded SQLite gallery file (default: RICE_GALLERY_PATH, else {defaults['gallery_path'].default})"
    )
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="serve on localhost, ingest a generated catalog, recognise generated clips")
    d.add_argument("--out", default="demo_out", help="where the generated catalog, clips and gallery go")
    d.add_argument("--products", type=int, default=12, help="generated products in the catalog")
    d.add_argument("--clips-per-product", type=int, default=2, help="generated clips recognised per product")
    d.add_argument("--top-k", type=int, default=3, help="SKUs shown per clip")
    d.add_argument("--seed", type=int, default=0, help="the generated catalog and clips (the same seed draws the same ones)")
    d.add_argument("--port", type=int, default=0, help="0 = any free port")
    d.add_argument("--checkpoint", help="RICE checkpoint to serve (default: the built-in ImageNet encoder)")
    d.add_argument("--min-top1", type=float, default=0.0, help="exit non-zero if fewer clips than this share rank right first")
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("grocery-check", help="real-data check: R@1/5/10 of clips built from a grocery-layout folder")
    g.add_argument(
        "--data",
        required=True,
        help=f"the public Grocery Store Dataset's dataset/ folder (git clone {GROCERY_DATA}): classes.csv, train.txt, "
        "val.txt and the photos; or a folder laid out the same way",
    )
    g.add_argument("--checkpoint", help="RICE checkpoint (default: the built-in ImageNet encoder)")
    g.add_argument("--split", default="val", help="the split whose photos become query clips: train or val (any SPLIT.txt in --data works)")
    g.add_argument("--num-frames", type=int, default=10, help="frames sampled per clip")
    g.add_argument("--seed", type=int, default=0, help="the generated clips (the same seed, the same clips)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a service setting for this run, e.g. verify=false")
    g.set_defaults(func=cmd_grocery_check)

    _add_training_commands(sub)

    i = sub.add_parser(
        "ingest",
        help="add a catalog to the gallery: a folder with one sub-folder per SKU, or a CSV of path,sku,shop_id,metadata",
        description="Concurrent and resumable: re-running skips finished files and never duplicates items "
        "(item ids derive from sku + path). The journal is per served model: after a model switch, the same command "
        "embeds everything again for the new model. Bad files are reported at the end; the exit status is 1 if any failed. "
        "CSV: columns path,sku[,shop_id[,metadata]] (a header row may name them); metadata is a JSON object such as "
        '{"name": "Cola"}, which in the CSV file is one quoted field with its quotes doubled: "{""name"": ""Cola""}".',
    )
    i.add_argument(
        "source",
        help="a catalog folder (one sub-folder per SKU holding its images, or images named by SKU, e.g. cola-330ml.jpg), "
        "a CSV file (see above), or a single image file (its name without the suffix is the SKU)",
    )
    i.add_argument("--url", default="http://127.0.0.1:8000", help=URL_HELP)
    i.add_argument("--in-process", action="store_true", help="no server: embed and store in this process (RICE_* settings)")
    i.add_argument("--shop-id", help="shop for every image (a CSV's shop_id column overrides it)")
    i.add_argument("--workers", type=int, default=4, help="concurrent uploads")
    i.add_argument("--state", help="journal file for resuming (default: .rice-ingest/<hash of source and target>.jsonl)")
    i.add_argument("--api-key", default=None, help="API key with write rights (or set RICE_CLIENT_API_KEY)")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.add_argument("--quiet", action="store_true", help="no progress bar")
    i.set_defaults(func=cmd_ingest)

    x = sub.add_parser(
        "reindex",
        help="re-embed the gallery with a new checkpoint into its own namespace, then switch the replicas to it",
        description="Re-embeds every item of the gallery named by the RICE_* settings (RICE_REDIS_URL or RICE_GALLERY_PATH) "
        "from its kept original image (RICE_BLOB_DIR) with CHECKPOINT, under the new model's version, keeping item ids, SKUs, "
        "shops, metadata and thumbnails; no local folder is needed. Prints the counts, then asks each --url replica to swap "
        "model and gallery together (no downtime, no mixed-version answers); it does not switch when a gallery item could "
        "not be embedded, unless --allow-missing.",
    )
    x.add_argument("--checkpoint", help="the new RICE checkpoint (omit for the built-in ImageNet encoder)")
    x.add_argument(
        "--catalog",
        help="optional extra source: a catalog as given to `rice ingest`; its images are embedded too (and replace the "
        "gallery's copy of the same item)",
    )
    x.add_argument("--allow-missing", action="store_true", help="switch even if some gallery items could not be embedded")
    x.add_argument("--url", action="append", default=[], help="a replica's base URL to switch (repeat for each); none = only embed")
    x.add_argument("--shop-id", help="shop for every image (a CSV's third column overrides it)")
    x.add_argument("--server-checkpoint", help="the checkpoint's path as the servers see it (default: this path, absolute)")
    x.add_argument("--api-key", default=None, help="API key with the admin right a, to switch the replicas (or RICE_CLIENT_API_KEY)")
    x.add_argument("--quiet", action="store_true", help="no progress bar")
    x.add_argument("--embed-only", metavar="DIR", help="only embed, into DIR in the `rice gallery import` format (no store, no switch)")
    x.set_defaults(func=cmd_reindex)

    from tools.gallery_io import register as register_gallery

    register_gallery(sub)

    r = sub.add_parser(
        "recognize",
        help="recognise clips and still images (files or folders) against a running service",
        description="Clips go to /v1/recognize, stills (by suffix, else by content) to /v1/recognize/image. "
        "A file the service cannot use is reported and the run goes on (exit status 1); no connection, a refused key "
        "or a bad parameter stops it.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("paths", nargs="+", help="clip or image files, or folders of them")
    r.add_argument("--url", default="http://127.0.0.1:8000", help=URL_HELP)
    r.add_argument("--top-k", type=int, default=5, help="SKUs per answer")
    r.add_argument("--shop-id", help="search only this shop's items")
    r.add_argument("--num-frames", type=int, default=10, help="frames sampled per clip")
    r.add_argument("--min-score", type=float, default=None, help="top-1 score from which an answer is a match (default: the model's)")
    r.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    r.add_argument("--api-key", default=None, help="API key (or set RICE_CLIENT_API_KEY)")
    out = r.add_mutually_exclusive_group()
    out.add_argument(
        "--json", action="store_true", help="print one JSON array of the full answers (request_id for feedback, match_probability, ...)"
    )
    out.add_argument("--csv", action="store_true", help=f"print CSV ({', '.join(CSV_FIELDS)}), one row per file")
    r.set_defaults(func=cmd_recognize)
    from tools import onnx_export, timeline_cli

    timeline_cli.add_parser(sub)
    onnx_export.add_parser(sub)
    show_defaults(p)
    return p


# Subcommands that need the training package (train/): the serving image carries the CLI without it.
TRAINING_COMMANDS = ("livebench", "train", "evaluate", "lpr4m", "import-checkpoint", "manifest", "retrain")


def _add_training_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Mount the training subcommands; where train/ is not installed, each answers with one line."""
    try:
        from tools import livebench, manifest, retrain
        from train import authors, lpr4m
        from train import evaluate as evaluate_job
        from train import train as train_job
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "train":
            raise
        for name in TRAINING_COMMANDS:
            # no option prefix: whatever the user typed after the name is taken as is, then answered in one line
            stub = sub.add_parser(name, help="needs the training code (pip install .[train])", add_help=False, prefix_chars="\x00")
            stub.add_argument("rest", nargs="*", help="(not read: the command needs the training code)")
            stub.set_defaults(func=_needs_training)
        return
    lb = sub.add_parser(
        "livebench",
        help="livestream conditions (scales, hand, clutter, absent products) through the service: R@k and open-set figures",
        description=livebench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    livebench.add_arguments(lb)
    lb.set_defaults(func=cmd_livebench)
    # The offline jobs live in train/ (no web code); the CLI only mounts their parsers.
    t = sub.add_parser(
        "train",
        help="train RICE (ICL/PMD/PFR) on a JSONL manifest; one CPU process, or N via torchrun",
        description="Also: torchrun --nproc-per-node N -m train.train ... (gloo on CPU, NCCL on GPU). "
        "The final checkpoint is served with `rice serve --checkpoint OUT/final.pt`.",
    )
    train_job.build_parser(t)
    t.set_defaults(func=train_job.run)
    e = sub.add_parser("evaluate", help="R@1/5/10 of clip queries against product images (global or per-shop galleries), JSON")
    evaluate_job.build_parser(e)
    e.set_defaults(func=evaluate_job.run)
    c = sub.add_parser(
        "lpr4m",
        help="convert an LPR4M download (img2dataset files or webdataset tars, or the 750K subset) into train/test manifests",
        description="LPR4M is the RICE authors' public livestream product dataset: its URL lists and annotation files are "
        "published at https://github.com/adxcreative/RICE (README sections 2-3); download the images with img2dataset "
        "(https://github.com/rom1504/img2dataset, --output_format files or webdataset), then point this command at them.",
    )
    lpr4m.add_arguments(c)
    c.set_defaults(func=lpr4m.run)
    a = sub.add_parser(
        "import-checkpoint",
        help="convert the RICE authors' released checkpoint (rice_final.pth) into this project's format",
        description="The RICE authors publish their code and checkpoints at https://github.com/adxcreative/RICE "
        "(rice_final.pth is linked from its README). The converted file is served with `rice serve --checkpoint OUT` "
        "and starts training with `rice train --init-from OUT`.",
    )
    authors.add_arguments(a)
    a.set_defaults(func=authors.run)

    manifest.add_parser(sub)
    retrain.add_parser(sub)


def _needs_training(args: argparse.Namespace) -> int:
    raise ModuleNotFoundError("No module named 'train'", name="train")


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user error (no connection, refused key, bad file, bad request) is one line
    on stderr and a distinct exit status (EXIT_CODES), never a traceback."""
    import httpx

    from index.errors import StoreUnavailable
    from model.checkpoint import CheckpointError
    from tools.client import RiceError, check_url
    from tools.ingest import CatalogError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "faiss.loader"):  # per-request and per-import chatter drowns the output
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    if getattr(args, "api_key", None) is None and "api_key" in args:
        args.api_key = os.environ.get("RICE_CLIENT_API_KEY")
    try:
        if isinstance(getattr(args, "url", None), str):  # every command that talks to a service: one check, one message
            args.url = check_url(args.url)
        elif isinstance(getattr(args, "url", None), list):
            args.url = [check_url(u) for u in args.url]
        return int(args.func(args))
    except RiceError as exc:
        print(f"rice {args.command}: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except (CatalogError, CheckpointError) as exc:  # a catalog or checkpoint file the user named is unusable
        print(f"rice {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except json.JSONDecodeError as exc:  # a manifest or annotations file that is not JSON (lines)
        print(f"rice {args.command}: a file given is not the JSON (lines) expected: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreUnavailable as exc:  # reindex: the gallery store named by RICE_REDIS_URL / RICE_GALLERY_PATH
        print(f"rice {args.command}: cannot use the gallery store ({exc})", file=sys.stderr)
        return EXIT_UNREACHABLE
    except httpx.TransportError as exc:  # the commands that use httpx directly (gallery, timeline)
        where = getattr(args, "url", "the service")
        print(f"rice {args.command}: cannot connect to {where} ({type(exc).__name__}: {exc}); is the service running?", file=sys.stderr)
        return EXIT_UNREACHABLE
    except OSError as exc:  # a local file the user named: missing, a folder, unreadable
        if exc.filename is None and not isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError | PermissionError):
            raise
        if exc.filename is None:  # the message names the file
            print(f"rice {args.command}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"rice {args.command}: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        if exc.name != "train" and not (exc.name or "").startswith("train."):
            raise
        # the serving image carries the CLI but not the training package (train/)
        why = "this installation has no training code (the serving image); run it from a source checkout with `pip install .[train]`"
        print(f"rice {args.command}: {why}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"rice {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
