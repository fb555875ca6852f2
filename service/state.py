"""The serving state: everything that depends on the served model, built and closed here.

The app factory builds one at start-up and the admin route builds a second one on a model switch;
both call `build_serving` / `close_serving` from this module, so construction lives in one place."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

from index.ann import AnnConfig, default_placer, set_search_threads
from index.records import Store, StoreUnavailable
from index.replica import GalleryReplica
from index.stores import open_store
from model.checkpoint import LoadedEncoder
from model.verdict import VerdictModel, builtin_verdict
from pipeline.batcher import Batcher
from pipeline.decode import DecodeLimits
from pipeline.decode_pool import DecodePool
from pipeline.engine import EncoderEngine
from pipeline.quality import QualityPooling
from pipeline.regions import RegionSearch, parse_grid, region_fusion
from pipeline.stages import Pipeline
from pipeline.stream_decode import StreamLimits
from pipeline.timeline_run import TimelineConfig, TimelineRunner
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
    engine = EncoderEngine(loaded, settings.device, settings.torch_threads, settings.dtype, settings.cuda_graphs)
    log.info("model %s from %s on %s (%s)", engine.model_version, engine.source, engine.device, engine.dtype)
    warm = engine.warm_up(settings.max_batch_size)
    log.info("warm-up batch of %d took %.2f s", settings.max_batch_size, warm)
    dtype = str(engine.dtype).removeprefix("torch.")
    metrics.model_info.info({"version": engine.model_version, "source": engine.source, "device": str(engine.device), "dtype": dtype})
    ann = AnnConfig(threshold=settings.ann_threshold, nprobe=settings.ann_nprobe)
    set_search_threads(settings.faiss_threads)
    replica = GalleryReplica(gallery_store, engine.model_version, engine.dim, ann, settings.sync_wait_s, default_placer())
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
        settings.max_batch_size,
        settings.max_wait_ms,
        settings.max_queue_frames,
        depth=settings.pipeline_depth,
        on_batch=on_batch,
        on_cancel=metrics.cancelled.inc,
        on_queue_wait=metrics.stage_seconds.labels("queue_wait").observe,
        on_error=metrics.batch_errors.inc,
        max_background=job_batch_frames(settings, engine),
    )

    def reject(where: str) -> None:
        metrics.rejected.labels(where).inc()

    limits = DecodeLimits(settings.max_duration_s, settings.max_frame_pixels, settings.max_decoded_frames, settings.decode_timeout_s)
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
    verify = verify_stage(settings, loaded, replica)
    pipeline = Pipeline(
        batcher,
        replica,
        engine.config.preprocess,
        limits,
        settings.max_frame_pixels,
        decode_pool,
        observe_stage=lambda stage, seconds: metrics.stage_seconds.labels(stage).observe(seconds),
        on_reject=reject,
        search_threads=settings.search_threads,
        search_max_batch=settings.search_max_batch,
        match_threshold=match_threshold(settings, loaded),
        pooling_stages=[QualityPooling()] if settings.frame_weighting == "agreement" else [],
        extra_stages=[
            *(
                [
                    RegionSearch(
                        batcher,
                        replica,
                        settings.region_frames,
                        region_fusion(settings.region_fusion),
                        parse_grid(settings.region_grid),
                        on_reject=reject,
                    )
                ]
                if settings.regions
                else []
            ),
            verify,
        ],
        view_side=settings.verify_side if settings.verify else 0,
        search_k=settings.verify_top_k,
        match_probability=match_probability(settings, verify.verdict),
    )
    return AppState(settings, metrics, engine, batcher, replica, pipeline, *timeline_runners(settings, pipeline), time.time())


def verify_stage(settings: Settings, loaded: LoadedEncoder, replica: GalleryReplica) -> Verify:
    """The verification stage: geometric checks when RICE_VERIFY is on; the verdict always (the
    checkpoint's verdict model, else the built-in encoder's; none for a checkpoint without one)."""
    verdict: VerdictModel | None = getattr(loaded, "verdict", None)
    if verdict is None and loaded.source.startswith("built-in"):
        verdict = builtin_verdict()
    cache = FeatureCache(replica.features, settings.feature_cache_items)
    return Verify(cache, verdict, settings.verify_top_k, settings.verify_frames, geometric=settings.verify)


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

    def config(max_duration_s: float) -> TimelineConfig:
        # The decode time budget bounds how long the decoder may go without producing a frame.
        limits = StreamLimits(max_duration_s, settings.max_frame_pixels, settings.decode_timeout_s)
        chunk = max(settings.max_batch_size, 8)
        return TimelineConfig(
            settings.timeline_sample_fps,
            settings.timeline_switch_cost,
            settings.timeline_min_contrast,
            settings.timeline_min_lift,
            settings.timeline_min_score,
            chunk_frames=chunk,
            limits=limits,
        )

    return TimelineRunner(pipeline, config(settings.max_duration_s)), TimelineRunner(pipeline, config(settings.max_job_duration_s))


async def close_serving(state: AppState) -> None:
    """Finish queued work, then release the model's batcher, decoders and replica (not the store)."""
    await state.batcher.stop(state.settings.drain_timeout_s)
    state.pipeline.close()
    await asyncio.to_thread(state.replica.stop)  # joins the follower thread: not on the event loop


def store_for(settings: Settings) -> Store:
    """The gallery store the settings ask for: shared Redis when RICE_REDIS_URL is set, else embedded SQLite."""
    return open_store(settings.redis_url, settings.redis_prefix, settings.redis_log_maxlen, settings.gallery_path)


# How long past RICE_DECODE_TIMEOUT_S a decode worker may stay silent before it is killed.
DECODE_KILL_GRACE_S = 10.0

# For a model without a calibrated threshold (the built-in encoder): measured with `rice livebench`
# (default pipeline) on train-split photos of the grocery data, 144 clips of catalog products vs 42
# clips of products left out of the gallery, `model.calibrate` at a target precision of 0.9 for
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
