"""The one settings class. Built once in `create_app` (or the CLI) and passed down; read from
environment variables with the RICE_ prefix, e.g. RICE_GALLERY_PATH=/data/gallery.db."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from index.ann import AnnConfig
from index.shards import ShardPlan
from pipeline.batcher import BatcherConfig
from pipeline.decode import DecodeLimits
from pipeline.jobs import JobConfig
from pipeline.regions import RegionConfig, parse_grid, region_fusion
from pipeline.stream_decode import StreamLimits
from pipeline.timeline_run import TimelineConfig


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RICE_", env_file=None, frozen=True)

    # model
    checkpoint: str | None = Field(None, description="RICE checkpoint to serve; unset = ImageNet EfficientNet-Lite0")
    device: str = Field("auto", description="'auto' (CUDA if present), 'cpu' or 'cuda[:N]'")
    match_threshold: float | None = Field(
        None, ge=-1, le=1, description="top-1 score from which an answer is a match; unset = the checkpoint's calibrated threshold"
    )
    torch_threads: int = Field(0, ge=0, description="intra-op threads for CPU inference; 0 = torch default")
    encoder_runtime: Literal["torch", "onnx", "auto"] = Field(
        "auto", description="encoder runtime: torch, onnx (ONNX Runtime, CPU only), auto (onnx on CPU unless RICE_DTYPE=bf16; CUDA: torch)"
    )
    onnx_precision: Literal["fp32", "int8"] = Field(
        "fp32", description="ONNX encoder precision: fp32, or int8 (static quantisation; faster, embeddings within cosine 0.99)"
    )
    onnx_dir: str | None = Field(
        None, description="where ONNX exports are cached per model version; unset = 'onnx' beside the gallery file (else data/onnx)"
    )

    # recognition stages (measured in docs/RESULTS.md, `rice livebench`)
    regions: bool = Field(
        True, description="also score region crops of a few frames against the gallery (about 1.5x encoder work per clip)"
    )
    region_frames: int = Field(3, ge=1, le=32, description="frames of a clip whose region crops are scored (one encode per crop)")
    region_grid: str = Field(
        "0.6:1,0.42:1", pattern=r"^\d?\.?\d+:\d(,\d?\.?\d+:\d)*$", description="region crops: side share:crops per row, per scale"
    )
    timeline_regions: bool = Field(
        True, description="timeline windows run region search too, as clips do (more accurate segments; about 2.5x encoder work per window)"
    )
    region_fusion: str = Field("max", pattern="^(max|mean)$", description="a SKU's score: max of whole-clip and best region, or their mean")
    frame_weighting: str = Field(
        "agreement", pattern="^(mean|agreement)$", description="clip vector: plain mean of frames, or weighted by agreement"
    )
    verify: bool = Field(True, description="verify the top SKUs with local features (SIFT + RANSAC) against their catalog images")
    verify_top_k: int = Field(10, ge=1, le=100, description="SKUs of the search that verification checks and re-ranks")
    verify_frames: int = Field(3, ge=1, le=32, description="frames of a clip matched against the catalog images")
    verify_side: int = Field(640, ge=128, le=2048, description="long side of the frames verification sees (one extra array per frame)")
    catalog_views: int = Field(
        0, ge=0, le=4, description="extra views of each catalog image embedded at ingestion (shrunk into a blurred surround, a crop)"
    )
    verify_min_side: int = Field(
        0,
        ge=0,
        le=2048,
        description="frames with a shorter long side are upscaled to it for SIFT (0 = never; e.g. 512 for low-resolution streams)",
    )
    feature_cache_items: int = Field(4096, ge=1, description="catalog items whose local features are kept in memory (LRU)")
    match_probability: float | None = Field(
        None, ge=0, le=1, description="match_probability from which an answer is a match; unset = the verdict model's calibrated one"
    )

    # gallery
    gallery_path: str = Field("data/gallery.db", description="embedded SQLite gallery file (':memory:' for none)")
    blob_dir: str | None = Field(
        None,
        description="where each item's original image is kept (for `rice reindex`); unset = originals/ beside the gallery file; "
        "with several replicas, a directory all of them share",
    )

    # gallery sync
    redis_url: str | None = Field(None, description="shared Redis gallery for many replicas (redis://host:port/db); unset = SQLite")
    redis_prefix: str = Field("rice:{gallery}:", description="prefix of every gallery key in Redis")
    redis_log_maxlen: int = Field(100_000, ge=0, description="mutations kept in the Redis stream (about); 0 = all")
    shards: int = Field(
        1,
        ge=1,
        le=1024,
        description="shop-sharded replica groups (1 = unsharded); more than 1 needs RICE_REDIS_URL and a shop id on gallery requests",
    )
    shard: int = Field(0, ge=0, description="the shard (0..RICE_SHARDS-1) whose shops this replica holds")
    sync_wait_s: float = Field(2.0, ge=0, le=60, description="longest wait for min_gallery_version (else 503)")
    ann_threshold: int = Field(200_000, ge=1, description="gallery size from which unfiltered search is approximate (IVF)")
    ann_nprobe: int = Field(32, ge=1, le=4096, description="IVF lists scanned per query (recall vs latency)")
    ann_rescore: int = Field(300, ge=1, le=100_000, description="compressed gallery: IVF-PQ shortlist rows re-scored exactly per query")
    compress_threshold: int = Field(
        200_000, ge=1000, description="gallery size from which vectors are kept as float16 + IVF-PQ, re-scored exactly (bounded memory)"
    )

    # batching
    max_batch_size: int = Field(32, ge=1, le=1024, description="frames per encoder batch")
    max_wait_ms: float = Field(5.0, ge=0, le=1000, description="how long a batch waits to fill")
    max_queue_frames: int = Field(2048, ge=1, description="queued frames beyond which requests get 429")

    # request limits (each a clear 4xx when exceeded)
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1, description="largest clip or image upload (413)")
    max_num_frames: int = Field(32, ge=1, le=256, description="largest num_frames a client may ask for")
    max_top_k: int = Field(100, ge=1, le=1000, description="largest top_k")
    max_duration_s: float = Field(600.0, gt=0, description="longest clip, in seconds (422)")
    max_frame_pixels: int = Field(3840 * 2160, ge=1, description="largest frame, width*height (422)")
    max_decoded_frames: int = Field(36000, ge=1, description="most frames a clip may contain (422)")
    decode_timeout_s: float = Field(
        20.0, gt=0, description="decode time budget per clip (422); a decoder still stuck 10 s later is killed and replaced"
    )
    decode_workers: int = Field(0, ge=0, le=64, description="decode worker processes; 0 = one per CPU core")
    decode_threads: int | None = Field(None, ge=1, le=64, description="former name of RICE_DECODE_WORKERS, still honoured when that is 0")
    decode_memory_mb: int = Field(
        2048, ge=0, description="address space a decode worker may add to its baseline before it is replaced (422); 0 = no limit"
    )
    decode_isolation: Literal["process", "thread"] = Field(
        "process", description="process: decode in isolated workers; thread: in the server (trusted input and benchmarks only)"
    )
    search_threads: int = Field(2, ge=1, le=64, description="threads running gallery searches (off the event loop)")
    search_max_batch: int = Field(64, ge=1, le=4096, description="most concurrent requests' queries searched as one faiss batch")
    faiss_threads: int = Field(1, ge=0, le=256, description="OpenMP threads per faiss call; 0 = faiss default (all cores)")
    max_metadata_bytes: int = Field(16 * 1024, ge=0, description="largest metadata JSON per gallery item")
    max_bulk_bytes: int = Field(
        2 * 1024**3, ge=1, description="largest POST /v1/gallery/bulk body (.npy + JSONL; 413); 150k x 1280-d float32 is 768 MB"
    )

    # timelines and timeline jobs
    timeline_sample_fps: float = Field(2.0, gt=0, le=30, description="frames sampled per second of a recording for timelines")
    timeline_switch_cost: float = Field(
        0.03, ge=0, le=1, description="timeline smoothing: the score a change of product must gain to be made (Viterbi switching cost)"
    )
    timeline_min_contrast: float = Field(
        0.06, ge=0, le=1, description="timeline: how far a SKU must score above a window's other candidates (their median) to count"
    )
    timeline_min_score: float = Field(
        0.5, ge=-1, le=1, description="timeline: score below which a SKU is never on screen (a request's min_score replaces it)"
    )
    timeline_min_lift: float = Field(
        0.02, ge=-1, le=1, description="timeline: how far a SKU must score above its median where other SKUs rank first, to count"
    )
    job_dir: str = Field(
        "data/jobs", description="where timeline job uploads are stored; with several replicas, a directory all of them share"
    )
    max_job_upload_bytes: int = Field(8 * 1024**3, ge=1, description="largest recording a timeline job accepts (413)")
    max_job_duration_s: float = Field(4 * 3600.0, gt=0, description="longest recording a timeline job accepts, in seconds")
    job_concurrency: int = Field(1, ge=1, le=64, description="timeline jobs running at once on each replica")
    job_batch_frames: int = Field(
        0, ge=0, description="most timeline-job frames per encoder batch; 0 = a whole batch on CUDA, an eighth of one on CPU"
    )
    job_lease_s: float = Field(30.0, ge=1, description="a replica silent this long is presumed dead and its job is run by another")
    job_max_attempts: int = Field(3, ge=1, description="times a job may be started before it is failed (it keeps killing its replica)")
    redis_jobs_prefix: str = Field("rice:{jobs}:", description="prefix of every timeline job key in Redis")

    # feedback and gallery enrichment (docs/RESULTS.md, "Feedback and gallery enrichment (issue 20)")
    feedback_record_ttl_s: float = Field(
        86400.0, gt=0, description="how long an answer can still take POST /v1/feedback (its request record expires then)"
    )
    feedback_max_records: int = Field(10_000, ge=1, description="request records kept at most (the oldest go first): bounds the store")
    feedback_keep_frames: bool = Field(False, description="also keep each answer's sampled frames as JPEG for feedback (privacy: off)")
    feedback_retention_days: float = Field(30.0, gt=0, description="how long verdicts (with the request's vectors) are kept")
    redis_feedback_prefix: str = Field("rice:{feedback}:", description="prefix of every request record and verdict key in Redis")
    enrich: Literal["off", "confirmed", "corrected"] = Field(
        "off", description="gallery views from feedback: off, correct verdicts (confirmed), or also wrong ones naming the SKU (corrected)"
    )
    enrich_view: Literal["clip", "closest"] = Field(
        "closest", description="the view a verdict adds: the clip vector, or of it and its region crops the one closest to the SKU's images"
    )
    enrich_max_views: int = Field(10, ge=1, le=1000, description="feedback views kept per SKU and shop (the oldest go first)")

    # serving
    dtype: str = Field("auto", pattern="^(auto|fp32|fp16|bf16)$", description="encoder compute dtype; auto = fp16 on CUDA, fp32 on CPU")
    cuda_graphs: bool = Field(True, description="capture the encoder as CUDA graphs per batch size at warm-up (CUDA only)")
    pipeline_depth: int = Field(2, ge=1, le=4, description="encoder batches in flight (2: the next batch is ready when one ends)")
    max_decode_pending: int = Field(64, ge=1, description="uploads waiting for or in decoding beyond which requests get 429")
    stall_after_s: float = Field(5.0, gt=0, description="/readyz fails when the batcher has work but finished no batch for this long")
    drain_timeout_s: float = Field(20.0, ge=0, description="on shutdown, how long queued frames may still be encoded")
    api_keys: SecretStr = Field(
        SecretStr(""),
        description='API keys and rights (r read, w gallery writes, a model switch): "key1:rwa,key2:r" or JSON {"k": "rw"}; empty = open',
    )
    allow_open: bool = Field(
        True, description="with no RICE_API_KEYS, serve writes and admin open (local development); false = refuse to start"
    )
    read_requires_key: bool = Field(False, description="with keys set, recognition and gallery reads need a key with r too")

    # server
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object, info: ValidationInfo) -> object:
        """An optional setting given as "" is unset: compose's `${VAR:-}` and `VAR=` in an env file
        pass empty strings, which must not become a checkpoint path or a Redis URL."""
        field = cls.model_fields.get(info.field_name or "")
        if value == "" and field is not None and field.default is None:
            return None
        return value

    @model_validator(mode="after")
    def _sharding_is_possible(self) -> Settings:
        """A sharded deployment is refused at start, in one line, unless it can work."""
        self.shard_plan()  # RICE_SHARD within 0..RICE_SHARDS-1
        if self.shards > 1 and not self.redis_url:
            raise ValueError(
                f"RICE_SHARDS={self.shards} needs RICE_REDIS_URL: the shards' galleries are written across replica groups through one Redis"
            )
        return self

    # Settings groups: the config objects the components take, built from the RICE_* fields above
    # (one flat environment namespace, so every documented name stays as it is). A component's own
    # defaults equal what these build from default settings (tests/test_settings_groups.py).

    def shard_plan(self) -> ShardPlan:
        return ShardPlan(self.shards, self.shard)

    def gallery_prefix(self, shard: int | None = None) -> str:
        """The Redis gallery prefix of `shard` (default: this replica's); RICE_REDIS_PREFIX itself when unsharded."""
        return self.shard_plan().prefix(self.redis_prefix, shard)

    def jobs_prefix(self) -> str:
        """This replica's timeline job prefix: jobs are claimed by any replica sharing the store, so per shard too."""
        return self.shard_plan().prefix(self.redis_jobs_prefix)

    def batcher_config(self, max_background: int | None = None) -> BatcherConfig:
        return BatcherConfig(self.max_batch_size, self.max_wait_ms, self.max_queue_frames, self.pipeline_depth, max_background)

    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(self.max_duration_s, self.max_frame_pixels, self.max_decoded_frames, self.decode_timeout_s)

    def ann_config(self) -> AnnConfig:
        return AnnConfig(
            threshold=self.ann_threshold, nprobe=self.ann_nprobe, compress_threshold=self.compress_threshold, rescore=self.ann_rescore
        )

    def region_config(self) -> RegionConfig:
        return RegionConfig(self.region_frames, region_fusion(self.region_fusion), parse_grid(self.region_grid))

    def job_config(self) -> JobConfig:
        return JobConfig(self.job_concurrency, self.job_lease_s, max_attempts=self.job_max_attempts)

    def timeline_config(self, max_duration_s: float | None = None) -> TimelineConfig:
        """Timelines of requests (the clip duration limit) or, given `max_duration_s`, of jobs."""
        # The decode time budget bounds how long the decoder may go without producing a frame.
        limits = StreamLimits(
            self.max_duration_s if max_duration_s is None else max_duration_s, self.max_frame_pixels, self.decode_timeout_s
        )
        return TimelineConfig(
            self.timeline_sample_fps,
            self.timeline_switch_cost,
            self.timeline_min_contrast,
            self.timeline_min_lift,
            self.timeline_min_score,
            chunk_frames=max(self.max_batch_size, 8),
            limits=limits,
        )
