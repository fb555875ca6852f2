"""The one settings class. Built once in `create_app` (or the CLI) and passed down; read from
environment variables with the RICE_ prefix, e.g. RICE_GALLERY_PATH=/data/gallery.db."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RICE_", env_file=None, frozen=True)

    # model
    checkpoint: str | None = Field(None, description="RICE checkpoint to serve; unset = ImageNet EfficientNet-Lite0")
    device: str = Field("auto", description="'auto' (CUDA if present), 'cpu' or 'cuda[:N]'")
    torch_threads: int = Field(0, ge=0, description="intra-op threads for CPU inference; 0 = torch default")

    # gallery
    gallery_path: str = Field("data/gallery.db", description="embedded SQLite gallery file (':memory:' for none)")

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
    decode_timeout_s: float = Field(20.0, gt=0, description="decode time budget per clip (422)")
    decode_threads: int = Field(4, ge=1, le=64, description="size of the decoding thread pool")
    max_metadata_bytes: int = Field(16 * 1024, ge=0, description="largest metadata JSON per gallery item")

    # server
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"
