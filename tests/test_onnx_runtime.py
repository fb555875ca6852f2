"""The ONNX Runtime encoder: runtime choice, export cache, verification against torch, fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from model.checkpoint import LoadedEncoder
from model.config import EncoderConfig, PreprocessConfig
from model.preprocess import prepare_frame
from pipeline import onnx_runtime
from pipeline.engine import EncoderEngine
from pipeline.onnx_runtime import cache_path, int8_dot_product, resolve_runtime
from service.app import create_app
from service.settings import Settings
from service.state import onnx_dir
from tests.conftest import settings_for
from tests.toy_backbone import ToyBackbone
from tools.cli import main
from tools.democatalog import DemoProduct


@pytest.fixture(autouse=True)
def fresh_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees only the exports it makes (no copies of another test's)."""
    monkeypatch.setattr(onnx_runtime, "_made", {})


def toy(version: str, seed: int = 0) -> LoadedEncoder:
    torch.manual_seed(seed)
    cfg = EncoderConfig("toy", preprocess=PreprocessConfig(32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), options={"embed_dim": 8})
    return LoadedEncoder(ToyBackbone(8, 12), cfg, version, "toy")


def onnx_engine(loaded: LoadedEncoder, root: Path, precision: str = "fp32") -> EncoderEngine:
    return EncoderEngine(loaded, "cpu", 1, runtime="onnx", onnx_precision=precision, onnx_dir=str(root))


def test_runtime_choice(caplog: pytest.LogCaptureFixture) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_runtime("auto", cpu) == "onnx" and resolve_runtime("onnx", cpu) == "onnx"
    assert resolve_runtime("auto", cuda) == "torch"  # CUDA: torch with fp16 and CUDA graphs
    assert resolve_runtime("torch", cpu) == "torch"
    with caplog.at_level(logging.WARNING, "rice.onnx"):
        assert resolve_runtime("onnx", cuda) == "torch"
    assert "CPU only" in caplog.text
    with pytest.raises(ValueError, match="unknown encoder runtime"):
        resolve_runtime("tensorrt", cpu)
    assert EncoderEngine(toy("toy-a"), "cpu").runtime == "torch"  # the engine's own default (tools, benches)
    # auto leaves an explicit torch dtype (RICE_DTYPE=bf16) to torch
    assert EncoderEngine(toy("toy-a"), "cpu", dtype="bf16", runtime="auto", onnx_dir="/nonexistent").runtime == "torch"


def test_settings_defaults_serve_onnx_fp32_beside_the_gallery(tmp_path: Path, encoder: LoadedEncoder) -> None:
    defaults = Settings()
    assert (defaults.encoder_runtime, defaults.onnx_precision, defaults.onnx_dir) == ("auto", "fp32", None)
    assert onnx_dir(defaults) == "data/onnx"
    assert onnx_dir(Settings(gallery_path=":memory:")) == "data/onnx"
    assert onnx_dir(Settings(gallery_path="/srv/rice/g.db", redis_url="redis://r:6379/0")) == "/srv/rice/onnx"
    assert onnx_dir(Settings(onnx_dir="/srv/onnx")) == "/srv/onnx"
    settings = settings_for(tmp_path)  # the defaults but for the gallery file (and the port)
    with TestClient(create_app(settings, encoder=encoder)) as client:
        engine = client.app.state.serving.current.engine  # type: ignore[attr-defined]
        assert engine.runtime == "onnx-fp32"
        assert 'runtime="onnx-fp32"' in client.get("/metrics").text  # rice_model_info says what serves
    assert cache_path(tmp_path / "onnx", encoder.model_version, "fp32").is_file()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_onnx_embeddings_match_torch(tmp_path: Path, encoder: LoadedEncoder, products: list[DemoProduct], precision: str) -> None:
    """The real encoder on product photos: cosine to torch >= 0.999 (fp32) / 0.99 (int8), and every
    product's nearest catalog image is the same under either runtime."""
    frames = np.stack([prepare_frame(p.image, encoder.config.preprocess) for p in products])  # [8, 224, 224, 3]
    torch_engine = EncoderEngine(encoder, "cpu", 1)
    engine = onnx_engine(encoder, tmp_path, precision)
    if precision == "int8" and not int8_dot_product():
        # An AVX2-only CPU: INT8 loses precision there (about 0.967), is refused and fp32 serves,
        # which is then held to fp32's bound.
        precision = "fp32"
    assert engine.runtime == f"onnx-{precision}" and engine.dim == 1280
    want, got = torch_engine.encode(frames), engine.encode([frames[:3], frames[3:]])
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    assert (got * want).sum(1).min() >= {"fp32": 0.999, "int8": 0.99}[precision]
    shifted = np.roll(frames, 12, axis=2)  # a second view of each product
    assert ((engine.encode(shifted) @ got.T).argmax(1) == (torch_engine.encode(shifted) @ want.T).argmax(1)).all()


def test_int8_below_its_tolerance_is_refused(
    tmp_path: Path, encoder: LoadedEncoder, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The INT8 graph is verified like fp32, against its own bound: with a bound it cannot meet
    (it measures about 0.995 on a VNNI CPU), it is refused, the refused file is removed, and
    the fp32 graph serves (still about twice torch eager's speed)."""
    monkeypatch.setitem(onnx_runtime.MIN_COSINE, "int8", 0.99999)
    with caplog.at_level(logging.WARNING, "rice.onnx"):
        assert onnx_engine(encoder, tmp_path, "int8").runtime == "onnx-fp32"
    assert "int8 encoder" in caplog.text and "refused: least cosine 0.9" in caplog.text
    assert "the ONNX int8 encoder does not serve; trying fp32" in caplog.text
    assert not cache_path(tmp_path, encoder.model_version, "int8").exists()  # not kept to be verified again
    assert cache_path(tmp_path, encoder.model_version, "fp32").is_file()


def test_int8_dot_product_reads_the_cpu_flags() -> None:
    assert int8_dot_product("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16\n")
    assert int8_dot_product("flags : fpu avx2 avx_vnni\n") and int8_dot_product("Features : fp asimd asimddp sve\n")
    assert not int8_dot_product("flags\t\t: fpu sse2 avx2 fma\n") and not int8_dot_product("")


def test_export_cache_is_reused_and_a_new_model_version_reexports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = onnx_engine(toy("toy-v1"), tmp_path)
    path = cache_path(tmp_path, "toy-v1", "fp32")
    assert first.runtime == "onnx-fp32" and path.is_file()
    assert first._onnx is not None and first._onnx.session.get_session_options().intra_op_num_threads == 1  # RICE_TORCH_THREADS
    stamp = path.stat().st_mtime_ns

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_runtime, "export_fp32", no_export)
    again = onnx_engine(toy("toy-v1"), tmp_path)  # same version: the cached file, verified, no export
    assert again.runtime == "onnx-fp32" and path.stat().st_mtime_ns == stamp
    monkeypatch.undo()
    monkeypatch.setattr(onnx_runtime, "_made", {})
    changed = toy("toy-v2", seed=1)  # other weights, other version: a new export of its own
    engine = onnx_engine(changed, tmp_path)
    assert engine.runtime == "onnx-fp32" and cache_path(tmp_path, "toy-v2", "fp32").is_file()
    frames = onnx_runtime.synthetic_frames(4, engine.frame_shape, seed=7)
    assert np.allclose(engine.encode(frames), EncoderEngine(changed, "cpu", 1).encode(frames), atol=1e-4)
    assert not np.allclose(engine.encode(frames), first.encode(frames), atol=1e-2)


def test_corrupt_cached_export_is_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = cache_path(tmp_path, "toy-v1", "fp32")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x08\x07not an onnx graph")
    with caplog.at_level(logging.INFO, "rice.onnx"):
        engine = onnx_engine(toy("toy-v1"), tmp_path)
    assert "does not load" in caplog.text and "re-exporting" in caplog.text
    assert engine.runtime == "onnx-fp32" and path.stat().st_size > 100


def test_export_that_does_not_match_torch_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exporter that produces another model's graph (as a tracing bug would) is refused by the
    verification, cached and fresh, and the engine encodes with torch."""
    real_export = onnx_runtime.export_fp32

    def wrong_export(backbone: torch.nn.Module, *args: object) -> None:
        other = toy("other", seed=5).backbone
        real_export(other, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx_runtime, "export_fp32", wrong_export)
    loaded = toy("toy-v1")
    with caplog.at_level(logging.INFO, "rice.onnx"):
        engine = onnx_engine(loaded, tmp_path)
    assert engine.runtime == "torch"
    assert "refused: least cosine" in caplog.text and "the encoder runs on torch" in caplog.text
    frames = onnx_runtime.synthetic_frames(3, engine.frame_shape, seed=2)
    assert np.array_equal(engine.encode(frames), EncoderEngine(loaded, "cpu", 1).encode(frames))


def test_export_that_raises_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def failing_export(*args: object) -> None:
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(onnx_runtime, "export_fp32", failing_export)
    with caplog.at_level(logging.ERROR, "rice.onnx"):
        engine = onnx_engine(toy("toy-v1"), tmp_path, "int8")
    assert engine.runtime == "torch" and "export of model toy-v1 failed (RuntimeError: unsupported operator)" in caplog.text
    assert not list(tmp_path.rglob("*.onnx"))  # no temp file left behind


def test_export_onnx_command_calibrates_on_photos_and_reports_refusals(
    tmp_path: Path, products: list[DemoProduct], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "catalog" / "sku1"
    photos.mkdir(parents=True)
    for i, p in enumerate(products):
        assert cv2.imwrite(str(photos / f"{i}.jpg"), cv2.cvtColor(p.image, cv2.COLOR_RGB2BGR))
    out = tmp_path / "cache"
    code = main(["export-onnx", "--precision", "all", "--images", str(tmp_path / "catalog"), "--dir", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("fp32: verified")
    if int8_dot_product():
        assert code == 0 and lines[1].startswith("int8: verified")
        assert sorted(p.name for p in out.rglob("*.onnx")) == ["fp32.onnx", "int8.onnx"]
    else:  # an AVX2-only CPU: INT8 is refused even when calibrated on the photos (module docstring)
        assert code == 1 and lines[1].startswith("int8: REFUSED (the service will run the fp32 graph)")
        assert sorted(p.name for p in out.rglob("*.onnx")) == ["fp32.onnx"]
    monkeypatch.setitem(onnx_runtime.MIN_COSINE, "int8", 0.99999)  # a bound it cannot meet: refused, exit 1
    assert main(["export-onnx", "--precision", "int8", "--images", str(tmp_path / "catalog"), "--dir", str(out)]) == 1
    assert capsys.readouterr().out.startswith("int8: REFUSED")
    assert sorted(p.name for p in out.rglob("*.onnx")) == ["fp32.onnx"]  # no refused file left to serve
