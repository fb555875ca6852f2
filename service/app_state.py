"""What the routes need, built once by the app factory."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from service.batcher import Batcher
from service.engine import EncoderEngine
from service.metrics import Metrics
from service.pipeline import Pipeline
from service.replica import GalleryReplica
from service.settings import Settings


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    engine: EncoderEngine
    batcher: Batcher
    replica: GalleryReplica
    pipeline: Pipeline
    started_at: float
    active: int = 0  # requests using this state right now (see routes.deps.get_state)

    async def idle(self, timeout_s: float) -> bool:
        """Wait until no request uses this state (after a model switch); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.active > 0:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True
