"""Settings groups are the component configs: no component has a default of its own that differs
from what the default settings give it, so a default lives in one place."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

from index.ann import AnnConfig
from pipeline.batcher import Batcher, BatcherConfig
from pipeline.decode import DecodeLimits
from pipeline.decode_pool import DecodePool
from pipeline.engine import EncoderEngine
from pipeline.jobs import JobConfig
from pipeline.regions import RegionConfig
from pipeline.search_batcher import SearchBatcher
from pipeline.stream_decode import StreamLimits
from pipeline.timeline_run import TimelineConfig
from service.settings import Settings
from service.state import DECODE_KILL_GRACE_S, onnx_dir

DEFAULT = Settings(_env_file=None)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("built", "component_default"),
    [
        (DEFAULT.batcher_config(), BatcherConfig()),
        (DEFAULT.decode_limits(), DecodeLimits()),
        (DEFAULT.ann_config(), AnnConfig()),
        (DEFAULT.region_config(), RegionConfig()),
        (DEFAULT.job_config(), JobConfig()),
        (DEFAULT.timeline_config(DEFAULT.max_job_duration_s).limits, StreamLimits(stall_timeout_s=DEFAULT.decode_timeout_s)),
    ],
    ids=["batcher", "decode", "ann", "regions", "jobs", "stream"],
)
def test_default_settings_build_the_components_default_configs(built: object, component_default: object) -> None:
    assert built == component_default


def test_timeline_config_defaults_match_the_settings() -> None:
    built, own = DEFAULT.timeline_config(), TimelineConfig()
    for name in ("sample_fps", "switch_cost", "min_contrast", "min_lift", "min_score", "chunk_frames"):
        assert getattr(built, name) == getattr(own, name), name


def _defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


def test_constructor_defaults_equal_the_settings_defaults() -> None:
    s = DEFAULT
    search = _defaults(SearchBatcher)
    assert (search["threads"], search["max_batch"]) == (s.search_threads, s.search_max_batch)
    pool = _defaults(DecodePool)
    assert (pool["max_pending"], pool["isolation"], pool["memory_limit_mb"]) == (
        s.max_decode_pending,
        s.decode_isolation,
        s.decode_memory_mb,
    )
    assert pool["time_budget_s"] == s.decode_timeout_s + DECODE_KILL_GRACE_S
    engine = _defaults(EncoderEngine)
    assert (engine["device"], engine["torch_threads"], engine["dtype"], engine["cuda_graphs"]) == (
        s.device,
        s.torch_threads,
        s.dtype,
        s.cuda_graphs,
    )
    assert _defaults(Batcher)["config"] == s.batcher_config()
    # The one deliberate difference: an engine built outside the service (offline tools, benches) runs
    # torch, with no ONNX export cache to manage; the service passes RICE_ENCODER_RUNTIME (auto).
    assert (engine["runtime"], s.encoder_runtime) == ("torch", "auto")
    assert (engine["onnx_precision"], engine["onnx_dir"]) == (s.onnx_precision, onnx_dir(s))
