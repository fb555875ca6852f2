"""bench.peer_litserve: both servers get the same encoder runtime, and the bench checks what each one runs.

The measuring itself (two servers under load) is the bench's job; these tests pin what makes the
comparison fair: the variables our side is started with are ones the service reads, with the runtime
asked for, and the runtime the service reports is read back correctly.
"""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from bench.peer_litserve import Runtime, extra_env, parser, served_runtime, service_env
from service.metrics import Metrics
from service.settings import Settings


@pytest.mark.parametrize(
    ("argv", "runtime", "precision", "expected"),
    [
        ([], "torch", "fp32", "torch"),  # the default: torch eager on both sides, as before ONNX existed
        (["--runtime", "onnx"], "onnx", "fp32", "onnx-fp32"),
        (["--runtime", "onnx", "--precision", "int8"], "onnx", "int8", "onnx-int8"),
    ],
)
def test_the_service_reads_the_runtime_both_sides_use(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], runtime: str, precision: str, expected: str
) -> None:
    args = parser().parse_args([*argv, "--onnx-dir", "/cache/onnx", "--threads", "3", "--service-env", "RICE_REGIONS=false"])
    rt = Runtime(args.runtime, args.precision, args.onnx_dir)
    assert rt.expected == expected
    env = service_env(args.batch_frames, args.wait_ms, args.threads, rt) | extra_env(args.service_env)
    for name in list(env):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = Settings()
    # explicit even for torch: the service's own default (auto) would be ONNX Runtime on a CPU
    assert (s.encoder_runtime, s.onnx_precision, s.onnx_dir) == (runtime, precision, "/cache/onnx")
    assert (s.max_batch_size, s.max_wait_ms, s.torch_threads, s.gallery_path) == (32, 5.0, 3, ":memory:")
    assert s.regions is False  # --service-env reaches our side


def test_served_runtime_is_read_from_the_model_metric() -> None:
    m = Metrics()
    assert served_runtime(generate_latest(m.registry).decode()) is None  # before the model is built
    m.model_info.info({"version": "v1", "source": "built-in", "device": "cpu", "dtype": "float32", "runtime": "onnx-int8"})
    assert served_runtime(generate_latest(m.registry).decode()) == "onnx-int8"


@pytest.mark.parametrize("pair", ["REGIONS=false", "RICE_REGIONS", "regions=false"])
def test_service_env_refuses_what_the_service_would_ignore(pair: str) -> None:
    with pytest.raises(SystemExit, match="RICE_NAME=VALUE"):
        extra_env([pair])


def test_unknown_runtime_or_precision_is_refused() -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["--runtime", "openvino"])
    with pytest.raises(SystemExit):
        parser().parse_args(["--precision", "bf16"])
