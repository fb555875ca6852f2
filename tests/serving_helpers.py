"""Helpers for the serving tests: a real uvicorn server on a thread, a tiny gated fake encoder,
and reading one sample out of /metrics."""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager

import httpx
import torch
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from model.checkpoint import LoadedEncoder
from model.config import EncoderConfig
from service.server import RunningServer, app_in_thread


class GatedBackbone(nn.Module):
    """A 4-d 'embedding' (mean colour per channel, 1): fast, deterministic, and it names its input.
    Clearing `gate` makes every batch block, as a wedged accelerator would; `seen` records the
    mean red level of every frame each batch contained."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.seen: list[list[float]] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.gate.wait(30)
        m = x.float().mean(dim=(2, 3))  # [B, 3]
        self.seen.append([round(v, 3) for v in m[:, 0].tolist()])
        emb = torch.cat([m, torch.ones(len(x), 1)], dim=1)  # [B, 4]
        return emb, emb[:, None]


def gated_encoder() -> tuple[LoadedEncoder, GatedBackbone]:
    backbone = GatedBackbone()
    return LoadedEncoder(backbone, EncoderConfig(), "gated-test", "test fake"), backbone


def live_server(app: FastAPI, timeout_s: float = 60.0) -> AbstractContextManager[RunningServer]:
    """Run `app` under a real uvicorn on a free port until the block ends (then a graceful stop)."""
    return app_in_thread(app, start_timeout_s=timeout_s)


def metric(url: str, name: str, **labels: str) -> float:
    """One sample's value from /metrics (0 when absent)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def wait_until(cond: object, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
