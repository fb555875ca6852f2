"""The serving state: everything that depends on the served model, built and closed here.

The app factory builds one at start-up and the admin route builds a second one on a model switch;
both call `build_serving` / `close_serving` from this module, so construction lives in one place."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from index.ann import default_placer, set_search_threads
from index.errors import StoreUnavailable
from index.records import Store
from index.replica import GalleryReplica
from index.shards import ShardStores
from index.stores import open_store
from model.checkpoint import BUILTIN_SOURCE, LoadedEncoder
from model.verdict import VerdictModel, builtin_verdict
from pipeline.batcher import Batcher
from pipeline.decode import DecodeLimits
from pipeline.decode_pool import DecodePool
from pipeline.engine import EncoderEngine
from pipeline.quality import QualityPooling
from pipeline.regions import RegionSearch
from pipeline.search_batcher import SearchBatcher
from pipeline.stages import Decode, Embed, Kind, Pipeline, PipelineConfig, Search, Stage
from pipeline.timeline_run import TimelineRunner
from pipeline.verify import FeatureCache, Verify
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("rice.state")


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    engine: EncoderEngine
    batcher: Batcher
    replica: GalleryReplica
    pipeline: Pipeline
    timeline: TimelineRunner  # recordings within the request limits (POST /v1/recognize/timeline)
    job_timeline: TimelineRunner  # recordings of timeline jobs (their own duration limit)
    started_at: float
    active: int = 0  # requests using this state right now (see routes.deps.get_state)
    calibration_warning: str | None = None  # the served model has no calibrated match threshold (see calibration_warning)

    async def idle(self, timeout_s: float) -> bool:
        """Wait until no request uses this state (after a model switch); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.active > 0:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True


def build_serving(settings: Settings, loaded: LoadedEncoder, gallery_store: Store, metrics: Metrics) -> AppState:
    """Everything that depends on the served model: engine (warmed), gallery replica of that model's
    namespace, batcher and pipeline. A model switch builds a second set and swaps it in whole, so a
    request never mixes one model's embeddings with another model's gallery. Blocking (model load,
    warm-up, gallery load): run it off the event loop, then call `state.batcher.start()` on it."""
    set_process_threads(settings)
    engine = EncoderEngine(
        loaded,
        settings.device,
        settings.torch_threads,
        settings.dtype,
        settings.cuda_graphs,
        runtime=settings.encoder_runtime,
        onnx_precision=settings.onnx_precision,
        onnx_dir=onnx_dir(settings),
    )
    log.info("model %s from %s on %s (%s, %s)", engine.model_version, engine.source, engine.device, engine.dtype, engine.runtime)
    warm = engine.warm_up(settings.max_batch_size)
    log.info("warm-up batch of %d took %.2f s", settings.max_batch_size, warm)
    dtype = str(engine.dtype).removeprefix("torch.")
    info = {"version": engine.model_version, "source": engine.source, "device": str(engine.device), "dtype": dtype}
    metrics.model_info.info(info | {"runtime": engine.runtime})  # torch, onnx-fp32 or onnx-int8: what verification let serve
    ann = settings.ann_config()
    replica = GalleryReplica(
        gallery_store, engine.model_version, engine.dim, ann, settings.sync_wait_s, default_placer(), shards=shard_stores(settings)
    )
    replica.start()  # loads the gallery; with Redis, also follows the shared stream
    try:
        warning = replica.namespace_warning()
    except StoreUnavailable:
        warning = None  # readiness reports the store; the warning is only advice
    if warning:
        log.warning("%s", warning)

    def on_batch(size: int, seconds: float) -> None:
        metrics.batch_size.observe(size)
        metrics.stage_seconds.labels("encode").observe(seconds)
        metrics.encoded_frames.inc(size)

    batcher = Batcher(
        engine.encode,
        settings.batcher_config(max_background=job_batch_frames(settings, engine)),
        on_batch=on_batch,
        on_cancel=metrics.cancelled.inc,
        on_queue_wait=metrics.stage_seconds.labels("queue_wait").observe,
        on_error=metrics.batch_errors.inc,
    )

    def reject(where: str) -> None:
        metrics.rejected.labels(where).inc()

    limits = settings.decode_limits()
    decode_pool = DecodePool(
        settings.decode_workers or settings.decode_threads or len(os.sched_getaffinity(0)),
        settings.max_decode_pending,
        on_decoded=metrics.stage_seconds.labels("decode").observe,
        on_reject=reject,
        on_worker_death=lambda cause: metrics.decode_worker_deaths.labels(cause).inc(),
        isolation=settings.decode_isolation,
        memory_limit_mb=settings.decode_memory_mb,
        # The worker stops itself at decode_timeout_s (a clean 422); this is for a decoder stuck in native code.
        time_budget_s=settings.decode_timeout_s + DECODE_KILL_GRACE_S,
    )
    search = SearchBatcher(replica.search, settings.search_threads, settings.search_max_batch, on_batch=metrics.search_batch_size.observe)
    parts = StageParts(settings, loaded, engine, replica, batcher, search, decode_pool, limits, reject)
    stages = [stage for make in STAGES if (stage := make(parts)) is not None]
    verify = next((s for s in stages if isinstance(s, Verify)), None)
    verdict = verify.verdict if verify is not None else None
    config = PipelineConfig(
        match_threshold(settings, loaded),
        engine.config.preprocess,
        match_probability(settings, verdict),
        settings.verify_top_k if verify is not None else 0,
    )
    pipeline = Pipeline(
        stages,
        config,
        observe_stage=lambda stage, seconds: metrics.stage_seconds.labels(stage).observe(seconds),
    )
    state = AppState(settings, metrics, engine, batcher, replica, pipeline, *timeline_runners(settings, pipeline), time.time())
    state.calibration_warning = calibration_warning(settings, loaded)
    if state.calibration_warning:
        log.warning("%s", state.calibration_warning)
    return state


@dataclass(frozen=True)
class StageParts:
    """What the stage factories build their stages from."""

    settings: Settings
    loaded: LoadedEncoder
    engine: EncoderEngine
    replica: GalleryReplica
    batcher: Batcher
    search: SearchBatcher
    decode_pool: DecodePool
    limits: DecodeLimits
    reject: Callable[[str], object]


def decode_stage(p: StageParts) -> Stage:
    view_side = p.settings.verify_side if p.settings.verify else 0  # grey views for verification, from the same decode
    return Decode(p.decode_pool, p.engine.config.preprocess, p.limits, p.settings.max_frame_pixels, view_side)


def embed_stage(p: StageParts) -> Stage:
    return Embed(p.batcher, p.reject)


def quality_stage(p: StageParts) -> Stage | None:
    return QualityPooling() if p.settings.frame_weighting == "agreement" else None


def search_stage(p: StageParts) -> Stage:
    return Search(p.search)


def region_stage(p: StageParts) -> Stage | None:
    s = p.settings
    if not s.regions:
        return None
    kinds: frozenset[Kind] = frozenset({"clip", "window"} if s.timeline_regions else {"clip"})
    return RegionSearch(p.batcher, p.search, s.region_config(), p.reject, kinds)


def set_process_threads(settings: Settings) -> None:
    """The only place that changes process-wide thread counts: torch's intra-op pool and faiss's OpenMP team."""
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    set_search_threads(settings.faiss_threads)


def onnx_dir(settings: Settings) -> str:
    """RICE_ONNX_DIR, else 'onnx' beside RICE_GALLERY_PATH (its default data/gallery.db also with Redis),
    else data/onnx (an in-memory gallery)."""
    if settings.onnx_dir:
        return settings.onnx_dir
    if settings.gallery_path == ":memory:":
        return str(Path("data") / "onnx")
    return str(Path(settings.gallery_path).parent / "onnx")


def verify_stage(p: StageParts) -> Stage:
    """The verification stage: geometric checks when RICE_VERIFY is on; the verdict always (the
    checkpoint's verdict model, else the built-in encoder's; none for a checkpoint without one).
    Last in the list: it re-ranks and judges what every stage before it found."""
    verdict: VerdictModel | None = getattr(p.loaded, "verdict", None)
    if verdict is None and p.loaded.source.startswith("built-in"):
        verdict = builtin_verdict()
    cache = FeatureCache(p.replica.features, p.settings.feature_cache_items)
    return Verify(
        cache, verdict, p.settings.verify_top_k, p.settings.verify_frames, geometric=p.settings.verify, min_side=p.settings.verify_min_side
    )


# The stage list, in order. Every request kind (clip, image, catalog image, timeline window) runs the
# stages that declare its kind; a factory returns None when its setting switches the stage off.
# Adding a stage: one module with the stage class, one factory line here.
STAGES: tuple[Callable[[StageParts], Stage | None], ...] = (
    decode_stage,
    embed_stage,
    quality_stage,
    search_stage,
    region_stage,
    verify_stage,
)


def match_probability(settings: Settings, verdict: VerdictModel | None) -> float:
    """RICE_MATCH_PROBABILITY, else the verdict model's calibrated threshold."""
    if settings.match_probability is not None:
        return settings.match_probability
    return verdict.threshold if verdict is not None else 0.5


def job_batch_frames(settings: Settings, engine: EncoderEngine) -> int:
    """RICE_JOB_BATCH_FRAMES, or by default: a whole batch on CUDA (a batch costs about the same
    however full, so job frames ride along for free), an eighth of one on a CPU (where each frame
    adds to the batch's time, and so to the latency of the clients' frames in it)."""
    if settings.job_batch_frames:
        return settings.job_batch_frames
    return settings.max_batch_size if engine.device.type == "cuda" else max(1, settings.max_batch_size // 8)


def timeline_runners(settings: Settings, pipeline: Pipeline) -> tuple[TimelineRunner, TimelineRunner]:
    """The timeline runner of requests (the clip limits) and that of jobs (the job limits)."""
    jobs = settings.timeline_config(settings.max_job_duration_s)
    return TimelineRunner(pipeline, settings.timeline_config()), TimelineRunner(pipeline, jobs)


async def close_serving(state: AppState) -> None:
    """Finish queued work, then release the model's batcher, decoders and replica (not the store)."""
    await state.batcher.stop(state.settings.drain_timeout_s)
    state.pipeline.close()
    await asyncio.to_thread(state.replica.stop)  # joins the follower thread: not on the event loop


def store_for(settings: Settings) -> Store:
    """The gallery store the settings ask for: shared Redis when RICE_REDIS_URL is set (this replica's
    shard of it when sharded), else embedded SQLite."""
    return open_store(settings.redis_url, settings.gallery_prefix(), settings.redis_log_maxlen, settings.gallery_path)


def shard_stores(settings: Settings) -> ShardStores | None:
    """On a sharded deployment, the other shards' gallery stores (same Redis, their prefixes),
    opened when a write for one of their shops first arrives; None unsharded."""
    plan = settings.shard_plan()
    if not plan.sharded:
        return None

    def open_shard(shard: int) -> Store:
        return open_store(settings.redis_url, settings.gallery_prefix(shard), settings.redis_log_maxlen, settings.gallery_path)

    return ShardStores(plan, open_shard)


# How long past RICE_DECODE_TIMEOUT_S a decode worker may stay silent before it is killed.
DECODE_KILL_GRACE_S = 10.0

# For a model without a calibrated threshold (the built-in encoder): measured with `rice livebench`
# (default pipeline) on train-split photos of the grocery data, 144 clips of catalog products vs 42
# clips of products left out of the gallery, `train.calibrate` at a target precision of 0.9 for
# match answers (docs/RESULTS.md). The built-in encoder's top-1 score barely separates the two
# (AUROC 0.51), so this threshold rejects nearly every answer in livestream conditions: "none of
# these" unless the product is shown large and clearly. A calibrated checkpoint replaces it.
UNCALIBRATED_MATCH_THRESHOLD = 0.7025


def match_threshold(settings: Settings, loaded: LoadedEncoder) -> float:
    """The operator's RICE_MATCH_THRESHOLD, else the checkpoint's calibrated one, else the fallback."""
    if settings.match_threshold is not None:
        return settings.match_threshold
    calibrated: float | None = getattr(loaded, "match_threshold", None)
    return UNCALIBRATED_MATCH_THRESHOLD if calibrated is None else calibrated


def calibration_warning(settings: Settings, loaded: LoadedEncoder) -> str | None:
    """A sentence for the start-up log and /v1/info when the match threshold is nobody's measurement
    for this model: neither RICE_MATCH_THRESHOLD nor a threshold stored in the checkpoint (the fallback
    was measured for the built-in encoder, so that one needs none). None otherwise."""
    if settings.match_threshold is not None or getattr(loaded, "match_threshold", None) is not None or loaded.source == BUILTIN_SOURCE:
        return None
    return (
        f"model {loaded.model_version} ({loaded.source}) has no calibrated match threshold; answers use the fallback "
        f"{UNCALIBRATED_MATCH_THRESHOLD}, measured for the built-in encoder, so 'match' may be wrong for this model: "
        "calibrate it (python -m train.calibrate --checkpoint ...) or set RICE_MATCH_THRESHOLD"
    )
