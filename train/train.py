"""RICE training: one CPU process, or N processes under torchrun (gloo on CPU, NCCL on GPU) with
DistributedDataParallel. Read top to bottom: config -> data -> model -> optimiser -> loop -> eval.

    python -m train.train --train train.jsonl --val val.jsonl --out runs/x
    torchrun --nproc-per-node 2 -m train.train --train train.jsonl --out runs/x

`OUT/last.pt` is written every --ckpt-every steps (and at the end) and resumes exactly with
--resume; `OUT/final.pt` is the servable checkpoint (`rice serve --checkpoint OUT/final.pt`).
Both are model.checkpoint files: the encoder plus training extras. With --select-every N the model
is evaluated on held-out products every N steps, `OUT/best.pt` keeps the best by held-out R@1,
training stops after --patience evaluations without a gain, and final.pt is the best one.

Gradient accumulation (--accum) averages gradients over micro-batches but does NOT enlarge the
contrastive batch: each micro-batch's clips only see that micro-batch's images (and those gathered
from other processes) as negatives. Use more processes (or a larger --batch-size) for more negatives.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model.backbones import backbone_names, build_backbone, get_spec
from model.checkpoint import read_checkpoint, save_checkpoint
from model.config import FRAME_FITS, IMAGE_FITS, EncoderConfig, PreprocessConfig
from model.normalize import normalize
from model.rice import RICE, RICEConfig, world_info
from train.data import ClipDataset, ClipRow, gallery_of, loader_options, read_manifest, read_manifests
from train.evaluate import evaluate_rows, read_sku_file


def build_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `rice train` / `python -m train.train`."""
    a = parser.add_argument
    a(
        "--preset",
        choices=sorted(PRESETS),
        help="the authors' hyper-parameters as one flag (printed at start; flags given explicitly win): "
        "lpr4m-v2 = their mmf code (ViT-B/32, v2 decoder, lr 1e-6/1e-4, warm-up 500 of 5000 steps, global batch 96, "
        "betas (0.9, 0.999), squashed frames and shop images); lpr4m-v1 = their CLIP4Clip code (lr 3e-7/3e-4, 1 epoch, "
        "10%% warm-up, global batch 128, fixed temperature 0.01, PFR v1). Needs --clip-weights (OpenAI ViT-B-32.pt) or --init-from",
    )
    a(
        "--train",
        required=True,
        nargs="+",
        help="JSONL manifest(s) of training (clip, image, sku) rows: several files or a quoted glob ('OUT/train-part-*.jsonl')",
    )
    a("--val", help="JSONL manifest evaluated at the end (R@1/5/10)")
    a("--val-gallery", help="gallery manifest for --val (default: the val rows' distinct images)")
    a("--per-shop", action="store_true", help="evaluate with per-shop galleries (LPR4M protocol)")
    a("--out", required=True, help="output folder: last.pt, final.pt, metrics.jsonl, eval.json")
    a("--resume", action="store_true", help="continue from OUT/last.pt")
    a("--init", help="start from this checkpoint's weights (its backbone and, when they match, its heads): e.g. the served model")
    a("--exclude-skus", help="file of SKUs left out of training (held-out products, e.g. heldout_skus.txt)")
    a("--skus", help="file of SKUs (one per line): train only on these products")
    a("--limit", type=int, default=0, help="train on at most the first N manifest rows left after --skus/--exclude-skus (0: all)")
    # model
    a("--backbone", default="efficientnet_lite0", help=f"a registered backbone (model.backbones): {', '.join(backbone_names())}")
    a("--backbone-options", default="", help="key=value,... settings for a backbone without its own flags (EncoderConfig.options)")
    a("--embed-dim", type=int, default=1280, help="EfficientNet projection size (1280 + --identity-proj starts at zero-shot)")
    a("--identity-proj", action="store_true", help="initialise the EfficientNet projection to the identity")
    a("--vit", default="768,12,12,32,224,512", help="ViT width,layers,heads,patch,image_size,embed_dim")
    a("--gelu", default="quick", choices=["quick", "exact"], help="ViT MLP activation: quick (OpenAI CLIP) or exact (open_clip LAION)")
    a(
        "--clip-weights",
        help="ViT weights to start from: OpenAI CLIP's public ViT-B-32.pt (TorchScript or state dict; its download URL is in "
        "clip/clip.py of https://github.com/openai/CLIP) or open_clip ViT-B/32 weights",
    )
    a("--no-pretrained", action="store_true", help="random init (tests)")
    a(
        "--init-from",
        help="start from this checkpoint (ours, or the authors' converted by `rice import-checkpoint`): its encoder, its "
        "preprocessing, and its RICE heads where they fit; the model flags must describe the same backbone",
    )
    a("--train-blocks", type=int, default=-1, help="train only the last N blocks of the backbone (-1: all)")
    a("--image-size", type=int, default=224, help="crop size; frames are resized to the same shorter side")
    a(
        "--frame-fit",
        default="squash",
        choices=FRAME_FITS,
        help="squash: whole frame to a 256 square, centre/random crop 224, as the authors do for 9:16 LPR4M frames (default); "
        "crop: shorter side + centre crop. Stored in the checkpoint: evaluation and the service then prepare frames the same way",
    )
    a(
        "--image-fit",
        default="letterbox",
        choices=IMAGE_FITS,
        help="shop/catalog images: letterbox (pad to a square first: whole packages, catalog photos; default) or squash "
        "(like the frames, as the authors prepare LPR4M shop images). Stored in the checkpoint",
    )
    a("--losses", default="icl,pmd,pfr", help="comma list of icl, pmd, pfr")
    a("--pmd-weight", type=float, default=1.0, help="weight of the PMD (pairwise matching) loss")
    a(
        "--pmd-form",
        default="small",
        choices=["small", "v2", "v2-mean"],
        help="small: fresh decoder of --decoder-width; v2: the authors' (token width, --decoder-heads heads, 8 by default as "
        "theirs, started from the backbone's last two blocks, CrossPooler, 10 x cos(pooled, learned vector)); "
        "v2-mean: this project's earlier v2 (the backbone's heads, score against the clip's mean token)",
    )
    a("--pfr-form", default="v2", choices=["v1", "v2"], help="v2: softmax over the keys, weight 1.0; v1: no softmax, weight 0.05")
    a("--pfr-norm", choices=["softmax", "none", "sum"], help="override the form's PFR weight normalisation (sum: divide by the sum)")
    a("--pfr-weight", type=float, help="override the form's PFR loss weight")
    a("--temperature", type=float, default=0.07, help="ICL temperature (initial value unless --fixed-temperature)")
    a("--fixed-temperature", action="store_true", help="keep the ICL temperature fixed (the authors' v1: 0.01)")
    a("--decoder-width", type=int, default=256, help="width of the fresh PMD decoder (--pmd-form small)")
    a("--decoder-heads", type=int, help="decoder attention heads (default 8, the authors' v2 default; v2-mean: the backbone's)")
    a("--match-threshold", type=float, help="a calibrated match score to store in the checkpoint (served as LoadedEncoder.match_threshold)")
    # optimisation
    a("--frames", type=int, default=10, help="frames per training clip")
    a("--eval-frames", type=int, default=10, help="frames per clip when evaluating (--val, --select-every)")
    a("--batch-size", type=int, default=32, help="per process, per micro-batch; with N processes the contrastive batch is N x this")
    a(
        "--accum",
        type=int,
        default=1,
        help="micro-batches per optimizer step. Does not enlarge the contrastive batch: negatives come from one micro-batch only",
    )
    a("--epochs", type=float, default=1.0, help="passes over the training manifest (fractions allowed)")
    a("--max-steps", type=int, default=0, help="schedule length in optimizer steps (overrides --epochs)")
    a("--stop-at-step", type=int, default=0, help="end this run early at this step (resume later with --resume)")
    a("--lr-backbone", type=float, default=1e-5, help="AdamW learning rate of the backbone")
    a("--lr-head", type=float, default=1e-4, help="AdamW learning rate of the projection and the PMD/PFR heads")
    a("--weight-decay", type=float, default=0.2, help="AdamW weight decay")
    a("--warmup", type=int, default=10, help="warm-up steps")
    a("--warmup-fraction", type=float, default=0.0, help="warm-up as a fraction of the schedule (overrides --warmup when > 0)")
    a("--adam-beta2", type=float, default=0.98, help="AdamW beta2 (the authors: 0.999)")
    a("--ckpt-every", type=int, default=200, help="write OUT/last.pt (what --resume reads) every N optimizer steps")
    a("--log-every", type=int, default=10, help="log the losses every N optimizer steps")
    a("--workers", type=int, default=2, help="data loader worker processes (decode clips in parallel)")
    a("--seed", type=int, default=0, help="random seed (initialisation, sampling, augmentation)")
    # model selection on held-out products
    a("--select-every", type=int, default=0, help="evaluate held-out products every N steps, keep OUT/best.pt by their R@1 (0: off)")
    a("--select-queries", help="manifest of held-out query clips (default: the --val rows whose SKU is in --exclude-skus)")
    a("--select-gallery", help="gallery for --select-queries (default: --val-gallery, else the queries' images)")
    a("--patience", type=int, default=0, help="stop after this many selections without a better held-out R@1 (0: run to the end)")
    a(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)",
    )
    a("--no-progress", action="store_true", help="no progress bar")


# The authors' recipes (github deepalchemist/crossview-semantic-alignment): v2 = mmf
# projects/videotoshop/configs/e2e_pretraining_vic_vim_rec.yaml (adam_w lr 1e-6, eps 1e-6, wd 0.2,
# lr_multiplier 100 for the heads, warmup_cosine 500 / 5000, global batch 96, Resize 256 + RandomCrop
# 224); v1 = ddp_train.sh + main_task_retrieval.py (lr 3e-4, coef_lr 1e-3 for CLIP, 1 epoch, batch
# 128, warmup_proportion 0.1, BertAdam betas (0.9, 0.999), temperature 0.01, reconstruction weight
# 0.05, CLIP's Resize + CenterCrop 224). "global_batch" is divided over the processes.
PRESETS: dict[str, dict[str, Any]] = {
    "lpr4m-v2": {
        "backbone": "vit",
        "vit": "768,12,12,32,224,512",
        "gelu": "quick",
        "losses": "icl,pmd,pfr",
        "pmd_form": "v2",
        "pfr_form": "v2",
        "decoder_heads": 8,
        "lr_backbone": 1e-6,
        "lr_head": 1e-4,
        "weight_decay": 0.2,
        "adam_beta2": 0.999,
        "warmup": 500,
        "max_steps": 5000,
        "global_batch": 96,
        "frames": 10,
        "eval_frames": 10,
        "frame_fit": "squash",
        "image_fit": "squash",
        "per_shop": True,
    },
    "lpr4m-v1": {
        "backbone": "vit",
        "vit": "768,12,12,32,224,512",
        "gelu": "quick",
        "losses": "icl,pmd,pfr",
        "pmd_form": "small",
        "decoder_width": 512,
        "decoder_heads": 8,
        "pfr_form": "v1",
        "lr_backbone": 3e-7,
        "lr_head": 3e-4,
        "weight_decay": 0.2,
        "adam_beta2": 0.999,
        "epochs": 1.0,
        "warmup_fraction": 0.1,
        "global_batch": 128,
        "temperature": 0.01,
        "fixed_temperature": True,
        "frames": 10,
        "eval_frames": 10,
        "frame_fit": "crop",
        "per_shop": True,
    },
}


def apply_preset(args: argparse.Namespace, world: int = 1) -> dict[str, Any]:
    """Set the preset's values on every argument still at its default (explicit flags win); returns what was set."""
    if not getattr(args, "preset", None):
        return {}
    p = argparse.ArgumentParser()
    build_parser(p)
    defaults = {a.dest: a.default for a in p._actions}
    applied: dict[str, Any] = {}
    for key, value in PRESETS[args.preset].items():
        if key == "global_batch":
            if args.batch_size == defaults["batch_size"]:
                args.batch_size = applied["batch_size"] = max(1, value // world)
        elif getattr(args, key) == defaults[key]:
            setattr(args, key, value)
            applied[key] = value
    if not (args.clip_weights or args.init_from or args.no_pretrained):
        raise ValueError(f"--preset {args.preset} starts from OpenAI CLIP ViT-B/32: pass --clip-weights ViT-B-32.pt (or --init-from)")
    return applied


def encoder_config(args: argparse.Namespace) -> EncoderConfig:
    """The encoder (and its preprocessing) the checkpoint will carry, from the backbone's registry entry."""
    cfg = get_spec(args.backbone).from_args(args)
    pre = cfg.preprocess
    fit = getattr(args, "frame_fit", pre.frame_fit)
    # squash: evaluate as the authors do (Resize 256 + CenterCrop 224 of the squashed frame), the square
    # training random-crops from; crop keeps resize = crop (shorter side to the crop size).
    resize = round(pre.crop * 256 / 224) if fit == "squash" else pre.resize
    return replace(cfg, preprocess=replace(pre, frame_fit=fit, resize=resize, image_fit=getattr(args, "image_fit", pre.image_fit)))


def rice_config(args: argparse.Namespace) -> RICEConfig:
    """The RICE losses and heads, with the --pmd-form / --pfr-form presets resolved."""
    losses = {x.strip() for x in args.losses.split(",") if x.strip()}
    if not losses or losses - {"icl", "pmd", "pfr"}:
        raise ValueError(f"--losses takes a comma-separated subset of icl,pmd,pfr; got {args.losses!r}")
    v1 = args.pfr_form == "v1"
    return RICEConfig(
        icl="icl" in losses,
        pmd="pmd" in losses,
        pfr="pfr" in losses,
        pmd_weight=args.pmd_weight,
        pfr_weight=args.pfr_weight if args.pfr_weight is not None else (0.05 if v1 else 1.0),
        temperature=args.temperature,
        learn_temperature=not getattr(args, "fixed_temperature", False),
        decoder_width=args.decoder_width,
        decoder_heads=args.decoder_heads or (_backbone_heads(args) if args.pmd_form == "v2-mean" else 8),
        pfr_norm=args.pfr_norm or ("none" if v1 else "softmax"),
        decoder=args.pmd_form,
    )


def _backbone_heads(args: argparse.Namespace) -> int:
    """The ViT's head count from --vit (v2-mean copies the backbone's blocks as they are); 8 otherwise."""
    return int(args.vit.split(",")[2]) if args.backbone == "vit" else 8


def build_model(args: argparse.Namespace, cfg: EncoderConfig) -> RICE:
    """Backbone (pretrained weights, frozen early blocks) + RICE heads."""
    spec = get_spec(cfg.backbone)
    backbone = build_backbone(cfg)
    if spec.prepare is not None:
        spec.prepare(backbone, args)
    blocks, tail = spec.trainable(backbone)
    if args.train_blocks >= 0:
        backbone.requires_grad_(False)
        for m in [*blocks[len(blocks) - args.train_blocks :], *tail] if args.train_blocks else tail:
            m.requires_grad_(True)
    model = RICE(backbone, rice_config(args))
    if getattr(args, "init_from", None):
        init_from_checkpoint(model, args.init_from)
    if model.decoder is not None and model.decoder.heads != model.cfg.decoder_heads:
        raise ValueError(f"the {model.cfg.decoder} decoder has {model.decoder.heads} heads, not --decoder-heads {model.cfg.decoder_heads}")
    return model


def init_from_checkpoint(model: RICE, path: str) -> None:
    """Load a checkpoint's encoder (strict) and those of its RICE heads whose names and shapes fit."""
    payload = read_checkpoint(path)
    try:
        model.backbone.load_state_dict(payload["encoder"], strict=True)
    except RuntimeError as exc:
        raise ValueError(f"--init-from {path}: its encoder does not match the backbone flags: {exc}") from exc
    own = model.state_dict()
    heads = {k: v for k, v in payload.get("heads", {}).items() if k in own and own[k].shape == v.shape and not k.startswith("backbone.")}
    model.load_state_dict(heads, strict=False)
    sys.stdout.write(f"init from {path}: encoder + {len(heads)} head tensors\n")


def selection_rows(args: argparse.Namespace, exclude: set[str]) -> tuple[list[ClipRow], list[ClipRow]] | None:
    """(held-out queries, their gallery) for --select-every, or None when selection is off."""
    if not args.select_every:
        return None
    if args.select_queries:
        queries = read_manifest(args.select_queries)
    elif args.val and exclude:
        queries = [r for r in read_manifest(args.val) if r.sku in exclude]
    else:
        raise ValueError("--select-every needs --select-queries, or --val with --exclude-skus (held-out products)")
    if not queries:
        raise ValueError("no held-out queries to select on (no --val row has an --exclude-skus SKU)")
    gallery_file = args.select_gallery or args.val_gallery
    return queries, read_manifest(gallery_file) if gallery_file else gallery_of(queries)


def init_from(model: RICE, path: str) -> None:
    """Warm start (`rice retrain` from the served model): the checkpoint's backbone weights must fit the
    built backbone exactly (same --backbone and shape flags); its heads are taken when they fit."""
    payload = read_checkpoint(path)
    model.backbone.load_state_dict(payload["encoder"], strict=True)
    heads = payload.get("heads") or {}
    own = model.state_dict()
    fitting = {k: v for k, v in heads.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)


def freeze_batchnorm(model: nn.Module) -> None:
    """Keep BatchNorm statistics at their pretrained values: small batches of a few products would skew them."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def param_groups(model: RICE, lr_backbone: float, lr_head: float, wd: float) -> list[dict[str, Any]]:
    """AdamW groups: backbone vs heads learning rates; no weight decay on norms, biases and scalars.
    Each group has a unique name (backbone, backbone_nodecay, head, head_nodecay) for the metrics log."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(("backbone" if name.startswith("backbone.") else "head", p.ndim >= 2), []).append(p)
    lrs = {"backbone": lr_backbone, "head": lr_head}
    return [
        {"params": ps, "lr": lrs[part], "weight_decay": wd if decay else 0.0, "name": part if decay else f"{part}_nodecay"}
        for (part, decay), ps in groups.items()
    ]


def warmup_cosine(warmup: int, total: int) -> Any:
    """lr multiplier: linear warm-up, then cosine to 0 at `total` steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


def epoch_batches(n: int, batch: int, world: int, rank: int, epoch: int, seed: int) -> list[list[int]]:
    """This rank's micro-batches for one epoch: a seeded permutation cut into global batches of
    batch*world (the last partial one dropped so every rank gathers equal shapes)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    g = batch * world
    return [perm[i + rank * batch : i + (rank + 1) * batch] for i in range(0, n - g + 1, g)]


def train_step_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], pre: PreprocessConfig, device: torch.device
) -> dict[str, torch.Tensor]:
    """Normalise a collated uint8 batch on the device and return the model's loss shares."""
    frames = batch["frames"].to(device)  # [b, T, H, W, 3] uint8
    b, t = frames.shape[:2]
    x = normalize(frames.flatten(0, 1), pre).view(b, t, 3, *frames.shape[2:4])  # [b, T, 3, H, W]
    images = normalize(batch["image"].to(device), pre)  # [b, 3, H, W]
    out: dict[str, torch.Tensor] = model(x, batch["mask"].to(device), images, batch["sku"].to(device))
    return out


def setup_distributed(device_arg: str) -> torch.device:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        cuda = device_arg.startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
    return torch.device(device_arg)


def run(args: argparse.Namespace) -> int:
    """Train, checkpoint, evaluate; returns the exit status."""
    device = setup_distributed(args.device)
    rank, world = world_info()
    applied = apply_preset(args, world)
    if applied and rank == 0:
        sys.stdout.write(f"preset {args.preset}: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in applied.items()) + "\n")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    # data
    cfg = encoder_config(args)
    if args.init_from:  # the checkpoint's architecture and preprocessing (e.g. the authors' Resize 256 + CenterCrop 224)
        cfg = EncoderConfig.from_dict(read_checkpoint(args.init_from)["encoder_config"])
    pre = cfg.preprocess
    exclude = read_sku_file(args.exclude_skus) or set()
    only = read_sku_file(args.skus)
    rows = [r for r in read_manifests(args.train) if r.sku not in exclude and (only is None or r.sku in only)]
    rows = rows[: args.limit] if args.limit > 0 else rows
    selection = selection_rows(args, exclude)
    dataset = ClipDataset(rows, pre, args.frames, train=True, seed=args.seed)
    per_epoch = len(rows) // (args.batch_size * world * args.accum)  # full global batches, as epoch_batches yields
    if per_epoch == 0:
        raise ValueError(f"{len(rows)} rows are fewer than one global batch ({args.batch_size * world * args.accum})")
    total = args.max_steps or max(1, round(args.epochs * per_epoch))

    # model and optimiser
    model = build_model(args, cfg)
    if getattr(args, "init", None) and not (args.resume and (out_dir / "last.pt").is_file()):
        init_from(model, args.init)
    model = model.to(device)
    optimizer = torch.optim.AdamW(
        param_groups(model, args.lr_backbone, args.lr_head, args.weight_decay), betas=(0.9, args.adam_beta2), eps=1e-6
    )
    warmup = round(args.warmup_fraction * total) if args.warmup_fraction > 0 else args.warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total))
    step = 0
    # Model selection on held-out products: best held-out R@1 so far, its step, selections since.
    best = {"r1": -1.0, "step": 0, "stale": 0}
    last, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if args.resume and last.is_file():
        state = read_checkpoint(last)["train_state"]
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step = int(state["step"])
        best.update(state.get("best", {}))
    cuda = device.type == "cuda"
    ddp: nn.Module = model
    if world > 1:
        # Without ICL the backbone's embedding head gets no gradient; DDP must then not wait for it.
        ddp = DistributedDataParallel(
            model, device_ids=[device.index] if cuda else None, find_unused_parameters=model.leaves_parameters_unused
        )
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()  # fp32 master weights, bf16 maths

    def save(path: Path, with_state: bool) -> str:
        extra: dict[str, Any] = {
            "rice_config": model.cfg.to_dict(),
            "heads": {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")},
        }
        extra["train_args"] = {k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool) or v is None}
        if with_state:
            extra["train_state"] = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "step": step,
                "best": dict(best),
            }
        return save_checkpoint(path, model.backbone, cfg, extra, match_threshold=args.match_threshold)

    def select() -> bool:
        """Evaluate the held-out products (rank 0), keep best.pt; True when patience has run out."""
        stop = torch.zeros(1, device=device)
        if rank == 0 and selection is not None:
            report = evaluate_rows(model.backbone, pre, selection[0], selection[1], args.per_shop, args.eval_frames, device, args.workers)
            freeze_batchnorm(model.backbone)  # evaluate_rows restored train mode, BatchNorm included
            r1 = report["recall"]["R@1"]
            if r1 > best["r1"]:
                best.update(r1=r1, step=step, stale=0)
                save(best_path, with_state=False)
            else:
                best["stale"] += 1
            if log:
                log.write(json.dumps({"step": step, "select": report["recall"], "best_step": best["step"]}) + "\n")
                log.flush()
            stop[0] = float(bool(args.patience) and best["stale"] >= args.patience)
        if world > 1:
            dist.broadcast(stop, 0)
        return bool(stop.item())

    log = (out_dir / "metrics.jsonl").open("a") if rank == 0 else None
    bar = tqdm(total=total, initial=step, disable=rank != 0 or args.no_progress, desc="train", dynamic_ncols=True)
    t0 = time.perf_counter()
    stopped = False
    while step < total and not stopped:
        epoch, done = divmod(step, per_epoch)
        dataset.set_epoch(epoch)
        batches = epoch_batches(len(rows), args.batch_size, world, rank, epoch, args.seed)[done * args.accum : per_epoch * args.accum]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, pin_memory=cuda, **loader_options(args.workers))
        ddp.train()
        freeze_batchnorm(model.backbone)
        sums: dict[str, float] = {}
        for i, batch in enumerate(loader):
            sync = (i + 1) % args.accum == 0
            with nullcontext() if sync or world == 1 else ddp.no_sync(), amp:  # type: ignore[operator]
                losses = train_step_loss(ddp, batch, pre, device)
                # DDP averages gradients over ranks; the loss shares need their sum, hence * world.
                (losses["loss"] * world / args.accum).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / args.accum
            if not sync:
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            model.logit_scale.data.clamp_(0, math.log(100))  # CLIP's cap on 1/temperature
            step += 1
            bar.update(1)
            if step % args.log_every == 0 or step == total:
                stats = {k: torch.tensor(v, device=device) for k, v in sorted(sums.items())}
                if world > 1:
                    for v in stats.values():
                        dist.all_reduce(v)  # sum of shares = the global-batch loss
                rec = {
                    "step": step,
                    **{k: round(float(v), 5) for k, v in stats.items()},
                    "temperature": round(math.exp(-model.logit_scale.item()), 5),
                }
                rec.update({f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}, seconds=round(time.perf_counter() - t0, 1))
                bar.set_postfix(loss=rec["loss"])
                if log:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
            sums = {}
            if selection is not None and (step % args.select_every == 0 or step == total):
                stopped = select()
            if rank == 0 and (stopped or step % args.ckpt_every == 0 or step in (total, args.stop_at_step)):
                save(last, with_state=True)
            if stopped or step >= total or step == args.stop_at_step:
                break
        if step == args.stop_at_step:
            break
    bar.close()
    if dist.is_initialized():
        # Leave the group before rank 0's evaluation, which may outlast a collective's timeout;
        # release DDP's reducer first, or gloo can abort at exit.
        del ddp
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        if selection is not None and best_path.is_file():
            # The servable model is the best on held-out products, not the last.
            kept = read_checkpoint(best_path)
            model.backbone.load_state_dict(kept["encoder"])
            model.load_state_dict(kept["heads"], strict=False)
            sys.stdout.write(f"best held-out R@1 {best['r1']} at step {best['step']} (of {step}): final.pt = best.pt\n")
        version = save(out_dir / "final.pt", with_state=False)
        sys.stdout.write(f"saved {out_dir / 'final.pt'} ({version}) after {step} steps, {time.perf_counter() - t0:.0f} s\n")
        if args.val:
            val = read_manifest(args.val)
            gallery = read_manifest(args.val_gallery) if args.val_gallery else gallery_of(val)
            report = evaluate_rows(model.backbone, pre, val, gallery, args.per_shop, args.eval_frames, device, args.workers)
            report["model_version"] = version
            (out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
            if log:
                log.write(json.dumps({"step": step, "eval": report["recall"]}) + "\n")
            sys.stdout.write(json.dumps(report["recall"]) + "\n")
    if log:
        log.close()
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    build_parser(p)
    sys.exit(run(p.parse_args()))
