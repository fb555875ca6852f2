"""Prometheus metrics, one registry per app (so several apps in one process never collide).

The names are a contract with the dashboard; docs/PERFORMANCE.md lists them. Add, don't rename.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from pipeline.decode_pool import DEATH_CAUSES

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

STAGES = ("decode", "queue_wait", "encode", "search")
# Cosine similarity of the top-1 SKU: 0.05 steps where thresholds usually sit, coarser below.
_SCORE_BUCKETS = (-0.5, 0.0, 0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
KINDS = ("clip", "image")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rice_requests_total", "HTTP requests by route and status", ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("rice_request_seconds", "HTTP request latency", ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("rice_inflight_requests", "HTTP requests being handled now", registry=r)
        self.stage_seconds = Histogram(
            "rice_stage_seconds",
            "Time per pipeline stage: decode (per upload), queue_wait (per request, until its first "
            "frame enters a batch), encode (per batch), search (per query)",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram("rice_batch_size", "Frames per encoder batch", buckets=_BATCH_BUCKETS, registry=r)
        self.search_batch_size = Histogram(
            "rice_search_batch_size", "Query vectors per gallery search batch", buckets=_BATCH_BUCKETS, registry=r
        )
        self.encoded_frames = Counter("rice_encoded_frames_total", "Frames the encoder has embedded", registry=r)
        self.queue_depth = Gauge("rice_queue_frames", "Frames waiting for the encoder", registry=r)
        self.decode_pending = Gauge("rice_decode_pending", "Uploads waiting for or in decoding", registry=r)
        self.rejected = Counter("rice_rejected_total", "Requests rejected with 429 because a bounded queue was full", ["queue"], registry=r)
        self.cancelled = Counter("rice_cancelled_frames_total", "Queued frames dropped because their client went away", registry=r)
        self.cancelled_requests = Counter(
            "rice_cancelled_requests_total", "Requests abandoned because their client disconnected", registry=r
        )
        self.batch_errors = Counter("rice_batch_errors_total", "Encoder batches that raised", registry=r)
        self.decode_worker_deaths = Counter(
            "rice_decode_worker_deaths_total",
            "Decode worker processes killed and replaced, by cause (crash, memory, timeout, protocol)",
            ["cause"],
            registry=r,
        )
        self.unexpected_errors = Counter("rice_unexpected_errors_total", "Requests that ended in a 500", registry=r)
        self.auth_failures = Counter("rice_auth_failures_total", "Requests refused by API-key checks", ["status"], registry=r)
        self.ready = Gauge("rice_ready", "1 when /readyz would answer 200", registry=r)
        self.batcher_stalled_seconds = Gauge(
            "rice_batcher_stalled_seconds", "Seconds the batcher has had work without finishing a batch", registry=r
        )
        self.gallery_items = Gauge("rice_gallery_items", "Images in this replica's gallery", registry=r)
        self.gallery_version = Gauge("rice_gallery_version", "Gallery version this replica has applied", registry=r)
        self.gallery_lag = Gauge(
            "rice_gallery_lag_seconds", "Age of the newest store change this replica has not yet applied (0 = in sync)", registry=r
        )
        self.top1_score = Histogram(
            "rice_top1_score",
            "Score of the best SKU per answered recognition (no sample when nothing matched at all)",
            ["kind"],
            buckets=_SCORE_BUCKETS,
            registry=r,
        )
        self.recognitions = Counter(
            "rice_recognitions_total",
            "Answered recognitions by kind and verdict (match=false: 'none of these')",
            ["kind", "match"],
            registry=r,
        )
        self.errors = Counter(
            "rice_errors_total",
            "Requests answered with a domain error, by its code (e.g. invalid_media, unsupported_media)",
            ["code"],
            registry=r,
        )
        self.other_namespace_items = Gauge(
            "rice_gallery_other_namespace_items",
            "Items stored under other models while the served model's gallery is empty (the model-switch trap; 0 otherwise)",
            registry=r,
        )
        self.jobs_running = Gauge("rice_jobs_running", "Timeline jobs running on this replica", registry=r)
        self.jobs_finished = Counter("rice_jobs_finished_total", "Timeline jobs this replica ended, by status", ["status"], registry=r)
        self.timeline_seconds = Counter(
            "rice_timeline_recording_seconds_total", "Seconds of recording turned into timelines (requests and jobs)", registry=r
        )
        self.feedback_verdicts = Counter(
            "rice_feedback_verdicts_total", "Feedback verdicts by shop (none: no shop filter) and verdict", ["shop", "verdict"], registry=r
        )
        self.feedback_record_errors = Counter(
            "rice_feedback_record_errors_total", "Answers whose request record could not be kept (they cannot take feedback)", registry=r
        )
        self.feedback_views = Counter(
            "rice_feedback_views_total", "Gallery views from feedback: added, removed, evicted (cap)", ["event"], registry=r
        )
        self.model_info = Info("rice_model", "The served model (version, source, device, dtype, runtime)", registry=r)
        for stage in STAGES:  # export every series from the start, so dashboards never see gaps
            self.stage_seconds.labels(stage)
        for cause in DEATH_CAUSES:
            self.decode_worker_deaths.labels(cause)
        for queue in ("encoder", "decode"):
            self.rejected.labels(queue)
        for kind in KINDS:
            self.top1_score.labels(kind)
            for verdict in ("true", "false"):
                self.recognitions.labels(kind, verdict)
        for verdict in ("correct", "wrong", "none_of_these"):  # the drift panel and alert divide by these
            self.feedback_verdicts.labels("none", verdict)
        for event in ("added", "removed", "evicted"):
            self.feedback_views.labels(event)
        for code in ("invalid_media", "unsupported_media", "payload_too_large", "overloaded", "unauthorized", "forbidden"):
            self.errors.labels(code)
