"""RICE training on CPU with tiny configs: overfitting, DDP equivalence, exact resume, real video files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from model.checkpoint import load_encoder, read_checkpoint
from model.config import ViTConfig
from model.encoder import clip_embedding
from model.rice import RICE, RICEConfig
from model.vit import VisionTransformer
from service.server import free_port
from tools.clipsynth import camera_motion_clip, write_video
from train.data import ClipDataset, ClipRow, gallery_of, read_manifest, write_manifest
from train.train import build_parser, param_groups, run

TINY_VIT = ViTConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4, embed_dim=16)
TINY_RICE = RICEConfig(decoder_width=32, decoder_heads=4)


def _tiny_model(seed: int = 0) -> RICE:
    torch.manual_seed(seed)
    return RICE(VisionTransformer(TINY_VIT), TINY_RICE)


def _global_batch(n: int = 8, t: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(123)
    frames = torch.randn(n, t, 3, 32, 32, generator=g)
    mask = torch.ones(n, t)
    mask[1, 2:] = 0
    mask[6, 1:] = 0
    images = torch.randn(n, 3, 32, 32, generator=g)
    skus = torch.tensor([0, 1, 2, 0, 3, 4, 5, 6])[:n]
    return frames, mask, images, skus


def _step(model: torch.nn.Module, rice: RICE, batch: tuple[torch.Tensor, ...], world: int) -> float:
    """One update as train.train does it: loss share * world, backward (DDP averages), step.
    SGD rather than AdamW: Adam's first step is ~lr * sign(grad), which turns float rounding
    noise in near-zero gradients into lr-sized differences."""
    opt = torch.optim.SGD(param_groups(rice, 0.1, 0.1, 0.0))
    out = model(*batch)
    (out["loss"] * world).backward()
    opt.step()
    loss = out["loss"].detach()
    if world > 1:
        dist.all_reduce(loss)
    return float(loss)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rice = _tiny_model()
        ddp = torch.nn.parallel.DistributedDataParallel(rice)
        n = 8 // world
        local = tuple(x[rank * n : (rank + 1) * n] for x in _global_batch())
        loss = _step(ddp, rice, local, world)
        if rank == 0:
            torch.save({"loss": loss, "state": rice.state_dict()}, out)
        del ddp  # release DDP's reducer threads before the process group goes
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.integration
def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path: Path) -> None:
    rice = _tiny_model()
    loss = _step(rice, rice, _global_batch(), world=1)
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    assert ddp["loss"] == pytest.approx(loss, rel=1e-5)
    # 1e-5 = lr 0.1 x 1e-4 of gradient rounding (sums in another order across ranks); a wrong
    # averaging or a missing share would differ by lr x grad, orders of magnitude more.
    for k, v in rice.state_dict().items():
        assert torch.allclose(ddp["state"][k], v, atol=1e-5), k


def test_tiny_model_overfits_16_pairs_to_recall_1() -> None:
    torch.manual_seed(0)
    images = torch.randn(16, 3, 32, 32)
    frames = images[:, None] + 0.5 * torch.randn(16, 4, 3, 32, 32)  # noisy views of each product
    mask = torch.ones(16, 4)
    mask[::3, 2:] = 0
    model = RICE(VisionTransformer(TINY_VIT), RICEConfig(decoder_width=32, decoder_heads=4, pfr_weight=0.05))
    opt = torch.optim.AdamW(param_groups(model, 3e-3, 3e-3, 0.0))
    for _ in range(30):
        opt.zero_grad()
        model(frames, mask, images, torch.arange(16))["loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        g = F.normalize(model.backbone(images)[0], dim=-1)
        f = model.backbone(frames.flatten(0, 1))[0].view(16, 4, -1)
        q = clip_embedding(f, mask)
    assert (q @ g.T).argmax(1).tolist() == list(range(16))


def _video_dataset(root: Path, products: int = 6, clips: int = 2) -> Path:
    """Products = coloured squares with a digit; clips = hand-held MP4s of them; manifest.jsonl."""
    rng = np.random.default_rng(0)
    rows = []
    for s in range(products):
        img = np.full((48, 48, 3), rng.integers(0, 255, 3), np.uint8)
        cv2.putText(img, str(s), (8, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.4, (255, 255, 255), 3)
        cv2.imwrite(str(root / f"p{s}.png"), img)
        for r in range(clips):
            write_video(camera_motion_clip(img, rng, num_frames=5, out_size=(40, 40)), root / f"c{s}_{r}.mp4")
            rows.append(ClipRow(str(root / f"c{s}_{r}.mp4"), str(root / f"p{s}.png"), f"sku{s}", shop=f"shop{s % 2}"))
    write_manifest(rows, root / "m.jsonl")
    return root / "m.jsonl"


def test_dataset_decodes_real_videos_with_frame_masks(tmp_path: Path) -> None:
    rows = read_manifest(_video_dataset(tmp_path, products=2, clips=1))
    assert rows[0].clip == str(tmp_path / "c0_0.mp4") and rows[0].shop == "shop0"
    pre = load_encoder(None).config.preprocess
    from dataclasses import replace

    pre = replace(pre, resize=32, crop=32)
    item = ClipDataset(rows, pre, num_frames=8, train=False)[0]  # 5 frames in the file, 8 asked
    assert item["frames"].shape == (8, 32, 32, 3) and item["mask"].tolist() == [1] * 5 + [0] * 3
    assert int(item["frames"][5:].abs().sum()) == 0
    train = ClipDataset(rows, pre, num_frames=4, train=True, cut_tail_p=1.0)
    kept = [int(train[0]["mask"].sum()) for train.epoch in range(6)]
    assert min(kept) >= 1 and max(kept) <= 4 and min(kept) < 4  # cut-tail drops frames in training only
    assert int(ClipDataset(rows, pre, num_frames=4, train=False, cut_tail_p=1.0)[0]["mask"].sum()) == 4


def _train_args(manifest: Path, out: Path, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    build_parser(p)
    argv = "--backbone vit --vit 32,2,4,8,32,16 --decoder-width 32 --decoder-heads 4 --frames 3 --batch-size 4 --max-steps 6 \
        --warmup 2 --workers 0 --no-progress --lr-backbone 1e-3 --lr-head 1e-3 --log-every 1 --ckpt-every 100"
    return p.parse_args(["--train", str(manifest), "--out", str(out), *argv.split(), *extra])


@pytest.mark.slow
def test_resume_n_plus_n_equals_2n_and_final_checkpoint_serves(tmp_path: Path) -> None:
    manifest = _video_dataset(tmp_path)  # 12 clips, batch 4: 3 steps per epoch, so resume crosses an epoch
    assert run(_train_args(manifest, tmp_path / "straight", "--val", str(manifest))) == 0
    assert run(_train_args(manifest, tmp_path / "resumed", "--stop-at-step", "3")) == 0
    assert read_checkpoint(tmp_path / "resumed" / "last.pt")["train_state"]["step"] == 3
    assert run(_train_args(manifest, tmp_path / "resumed", "--resume")) == 0
    a = read_checkpoint(tmp_path / "straight" / "final.pt")
    b = read_checkpoint(tmp_path / "resumed" / "final.pt")
    for k, v in a["encoder"].items():
        assert torch.equal(v, b["encoder"][k]), k
    for k, v in a["heads"].items():
        assert torch.equal(v, b["heads"][k]), k
    assert a["model_version"] == b["model_version"]
    # The service builds the encoder from the checkpoint alone.
    loaded = load_encoder(tmp_path / "straight" / "final.pt")
    assert loaded.model_version == a["model_version"] and loaded.config.preprocess.crop == 32
    log = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6] and "eval" in log[-1]
    assert set(json.loads((tmp_path / "straight" / "eval.json").read_text())["recall"]) == {"R@1", "R@5", "R@10"}


@pytest.mark.slow
def test_selection_on_held_out_products_keeps_the_best_checkpoint(tmp_path: Path) -> None:
    """--select-every: held-out products (left out of training) are evaluated every step; best.pt is the
    best held-out R@1 so far (first reached), final.pt equals it, and training stops once --patience
    selections in a row bring no gain. Every optimiser group's learning rate is logged."""
    manifest = _video_dataset(tmp_path)  # 6 products x 2 clips
    (tmp_path / "held.txt").write_text("sku0\nsku1\n")
    write_manifest(gallery_of(read_manifest(manifest)), tmp_path / "gallery.jsonl")  # all 6 products compete
    args = _train_args(
        manifest,
        tmp_path / "sel",
        *("--exclude-skus", str(tmp_path / "held.txt"), "--val", str(manifest), "--val-gallery", str(tmp_path / "gallery.jsonl")),
        *("--select-every", "1", "--patience", "2"),
    )
    args.max_steps = 8
    assert run(args) == 0
    log = [json.loads(x) for x in (tmp_path / "sel" / "metrics.jsonl").read_text().splitlines()]
    picks = [r for r in log if "select" in r]
    r1 = [r["select"]["R@1"] for r in picks]
    best_i = r1.index(max(r1))
    assert [r["step"] for r in picks] == list(range(1, len(picks) + 1))
    for i, r in enumerate(picks):  # best so far, the first step that reached it
        assert r["best_step"] == r1.index(max(r1[: i + 1])) + 1
    if len(picks) < 8:  # stopped early: exactly `patience` selections without a gain at the end
        assert len(picks) - 1 - best_i == 2
    else:
        assert len(picks) - 1 - best_i < 2
    best, final = read_checkpoint(tmp_path / "sel" / "best.pt"), read_checkpoint(tmp_path / "sel" / "final.pt")
    assert best["model_version"] == final["model_version"]
    losses = [r for r in log if "loss" in r]
    assert {"lr_backbone", "lr_backbone_nodecay", "lr_head", "lr_head_nodecay"} <= set(losses[0])
