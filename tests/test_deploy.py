"""The deployable stack, checked without a Docker daemon: the compose file validates, the Dockerfile
lints clean, and every metric the Grafana dashboard queries is exported by the service."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} missing: `pip install -e .[dev]` installs it"
    return str(path)


# What an operator must set before compose starts anything (see docker-compose.yml).
OPERATOR_ENV = {"RICE_API_KEYS": "ops-key-1234:rwa", "GRAFANA_ADMIN_PASSWORD": "not-admin-1234"}


def _run_compose_config(files: tuple[str, ...], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    args = [_tool("docker-compose")]
    for f in files:
        args += ["-f", f]
    clean = {k: v for k, v in os.environ.items() if k not in ("RICE_API_KEYS", "RICE_ALLOW_OPEN", "GRAFANA_ADMIN_PASSWORD")}
    return subprocess.run([*args, "config", "--format", "json"], cwd=ROOT, capture_output=True, text=True, timeout=60, env={**clean, **env})


def _compose_config(*files: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    out = _run_compose_config(files, OPERATOR_ENV if env is None else env)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    return dict(json.loads(out.stdout))


def test_compose_file_is_valid_and_wires_the_stack() -> None:
    cfg = _compose_config("docker-compose.yml")
    services = cfg["services"]
    assert {"redis", "api-1", "api-2", "prometheus", "grafana"} <= set(services)
    cmd = services["redis"]["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes" and cmd[cmd.index("--appendfsync") + 1] == "always"
    assert any(v["target"] == "/data" for v in services["redis"]["volumes"])
    for name in ("api-1", "api-2"):
        api = services[name]
        assert api["environment"]["RICE_REDIS_URL"] == "redis://redis:6379/0"
        devices = api["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    scrape = (ROOT / "docker/prometheus.yml").read_text()
    assert "api-1:8000" in scrape and "api-2:8000" in scrape


def test_compose_starts_nothing_open() -> None:
    """Grafana's admin password has no default; the replicas get the operator's keys, and without
    keys they run with RICE_ALLOW_OPEN=false (so they refuse to start) unless the operator says true."""
    refused = _run_compose_config(("docker-compose.yml",), {"RICE_API_KEYS": "ops-key-1234:rwa"})
    # (this compose build reports the error on stderr and prints no config, whatever its exit status)
    assert "GRAFANA_ADMIN_PASSWORD is missing a value" in refused.stderr and not refused.stdout.strip()
    keyed = _compose_config("docker-compose.yml")["services"]
    assert keyed["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "not-admin-1234"
    no_keys = _compose_config("docker-compose.yml", env={"GRAFANA_ADMIN_PASSWORD": "x"})["services"]
    opened = _compose_config("docker-compose.yml", env={"GRAFANA_ADMIN_PASSWORD": "x", "RICE_ALLOW_OPEN": "true"})["services"]
    for name in ("api-1", "api-2"):
        assert keyed[name]["environment"]["RICE_API_KEYS"] == "ops-key-1234:rwa"
        assert no_keys[name]["environment"]["RICE_ALLOW_OPEN"] == "false"
        assert opened[name]["environment"]["RICE_ALLOW_OPEN"] == "true"
    assert re.search(r"RICE_ALLOW_OPEN=false", (ROOT / "Dockerfile").read_text()), "the image itself must not start open"


def test_cpu_override_drops_the_gpu_reservation() -> None:
    services = _compose_config("docker-compose.yml", "docker/compose.cpu.yml")["services"]
    for name in ("api-1", "api-2"):
        assert "deploy" not in services[name] or not services[name]["deploy"]
        assert services[name]["build"]["args"]["VARIANT"] == "cpu"


def test_dockerfile_lints_clean() -> None:
    out = subprocess.run([_tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "HEALTHCHECK" in text and "/readyz" in text
    assert re.search(r"^USER (?!root|0\b)", text, re.M), "the runtime must not run as root"


def _exported_samples(metrics_text: str) -> set[str]:
    """Every sample name the exposition can contain, from its # TYPE lines (works before any observation)."""
    suffixes = {"histogram": ["_bucket", "_sum", "_count"], "summary": ["_sum", "_count"], "info": ["_info"]}
    names: set[str] = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            names.update(family + s for s in suffixes.get(kind, [""]))  # counters are listed with their _total
    return names


def test_every_dashboard_metric_is_exported(client: TestClient) -> None:
    dashboard = json.loads((ROOT / "docker/grafana/dashboards/rice.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queried = {m for e in exprs for m in re.findall(r"\brice_[a-z0-9_]+", e)}
    assert len(queried) >= 10
    exported = _exported_samples(client.get("/metrics").text)
    assert queried - exported == set(), f"dashboard queries metrics the service does not export: {sorted(queried - exported)}"
    provisioned = (ROOT / "docker/grafana/provisioning/datasources/prometheus.yml").read_text()
    assert all(p["datasource"]["uid"] in provisioned for p in dashboard["panels"])


def test_readme_documents_every_setting() -> None:
    from service.settings import Settings

    readme = (ROOT / "README.md").read_text()
    missing = [f"RICE_{name.upper()}" for name in Settings.model_fields if f"`RICE_{name.upper()}`" not in readme]
    assert missing == [], f"settings missing from the README table: {missing}"


def test_the_container_entry_point_refuses_to_start_open_with_a_clear_message() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RICE_")}
    env.update(RICE_ALLOW_OPEN="false", RICE_GALLERY_PATH=":memory:")
    out = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "RICE_API_KEYS is empty and RICE_ALLOW_OPEN is false" in out.stderr and "Traceback" not in out.stderr
