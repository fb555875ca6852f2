"""What the routes need, built once by the app factory."""

from __future__ import annotations

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
