"""Prometheus metrics, one registry per app (so several apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rice_requests_total", "HTTP requests by route and status", ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("rice_request_seconds", "HTTP request latency", ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Histogram(
            "rice_stage_seconds",
            "Time per pipeline stage (decode, queue_wait, encode, search)",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram("rice_batch_size", "Frames per encoder batch", buckets=_BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("rice_queue_frames", "Frames waiting for the encoder", registry=r)
        self.rejected = Counter("rice_rejected_total", "Requests rejected because the queue was full (429)", registry=r)
        self.cancelled = Counter("rice_cancelled_frames_total", "Queued frames dropped because their client went away", registry=r)
        self.batch_errors = Counter("rice_batch_errors_total", "Encoder batches that raised", registry=r)
        self.unexpected_errors = Counter("rice_unexpected_errors_total", "Requests that ended in a 500", registry=r)
        self.gallery_items = Gauge("rice_gallery_items", "Images in this replica's gallery", registry=r)
        self.gallery_version = Gauge("rice_gallery_version", "Gallery version this replica has applied", registry=r)
        self.model_info = Info("rice_model", "The served model", registry=r)
