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

import pytest
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
    env.update(RICE_ALLOW_OPEN="false", RICE_GALLERY_PATH=":memory:", RICE_PORT="0")  # any port: 8000 may be taken
    out = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "RICE_API_KEYS is empty and RICE_ALLOW_OPEN is false" in out.stderr and "Traceback" not in out.stderr


def _dockerfile_env() -> dict[str, str]:
    """The runtime stage's ENV values (RICE_* only), as the container sees them."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    runtime = text[text.index("AS runtime") :]
    env: dict[str, str] = {}
    for line in runtime.splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(RICE_\w+)=(\S+)", line)))
    return env


def test_optional_settings_given_as_empty_strings_are_unset(monkeypatch: Any) -> None:
    """`VAR=` in an env file or compose's `${VAR:-}` hands the service "": that means unset, not a path."""
    from service.settings import Settings

    optional = [name for name, field in Settings.model_fields.items() if field.default is None]
    assert {"checkpoint", "redis_url", "match_threshold"} <= set(optional)
    for name in optional:
        monkeypatch.setenv(f"RICE_{name.upper()}", "")
    settings = Settings()
    assert all(getattr(settings, name) is None for name in optional)


@pytest.mark.integration
def test_the_service_starts_with_the_compose_environment(tmp_path: Path, redis_server: Any) -> None:
    """The api replicas' environment exactly as compose resolves it with only the required keys set
    (plus the image's ENV), with the hosts and volumes swapped for local ones, becomes ready."""
    from service.server import free_port
    from tools.service_process import wait_ready

    compose_env = _compose_config("docker-compose.yml")["services"]["api-1"]["environment"]
    assert compose_env["RICE_CHECKPOINT"] is None, "an unset RICE_CHECKPOINT must stay unset, not become ''"
    assert all(v != "" for v in compose_env.values()), f"compose passes empty strings: {compose_env}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RICE_")}
    env.update(_dockerfile_env())
    env.update({k: v for k, v in compose_env.items() if v is not None})
    port = free_port()
    local = {  # the container's hosts and mounted volumes, on this machine
        "RICE_REDIS_URL": redis_server.url,
        "RICE_GALLERY_PATH": str(tmp_path / "gallery.db"),
        "RICE_JOB_DIR": str(tmp_path / "jobs"),
        "RICE_BLOB_DIR": str(tmp_path / "originals"),
        "RICE_HOST": "127.0.0.1",
        "RICE_PORT": str(port),
        "PYTHONPATH": str(ROOT),
    }
    assert set(local) - {"PYTHONPATH"} <= set(env), "swapped settings the container does not set"
    env.update(local)
    log = tmp_path / "service.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout_s=300)
    except RuntimeError:
        raise AssertionError(log.read_text(errors="replace")[-3000:]) from None
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)


def test_the_stack_publishes_only_the_api_beyond_localhost() -> None:
    """Prometheus and Grafana (anonymous viewing) listen on 127.0.0.1 unless the operator opens them;
    the replicas share one originals volume (what `rice reindex` re-embeds from)."""
    services = _compose_config("docker-compose.yml")["services"]
    for name in ("prometheus", "grafana", "redis"):
        assert all(p.get("host_ip") == "127.0.0.1" for p in services[name]["ports"]), services[name]["ports"]
    for name in ("api-1", "api-2"):
        blob_dir = services[name]["environment"]["RICE_BLOB_DIR"]
        assert any(v["target"] == blob_dir and v["type"] == "volume" for v in services[name]["volumes"])


def test_the_image_matches_the_makefile_and_carries_the_cli() -> None:
    """Same torch as `make setup`; the `rice` CLI installed (tools/ copied); the healthcheck follows RICE_PORT."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    make_torch = re.search(r"TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text())
    image_torch = re.search(r"ARG TORCH_VERSION=(\S+)", dockerfile)
    assert make_torch and image_torch and make_torch.group(1) == image_torch.group(1)
    assert re.search(r"^COPY tools ", dockerfile, re.M)
    health = dockerfile[dockerfile.index("HEALTHCHECK") :]
    assert "RICE_PORT" in health and ":8000/" not in health


SHARDED = ("api-s0a", "api-s0b", "api-s1")


def _sharded_config(*files: str) -> dict[str, Any]:
    args = [_tool("docker-compose"), *(a for f in files for a in ("-f", f)), "--profile", "sharded", "config", "--format", "json"]
    clean = {k: v for k, v in os.environ.items() if k not in ("RICE_API_KEYS", "RICE_ALLOW_OPEN", "GRAFANA_ADMIN_PASSWORD")}
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60, env={**clean, **OPERATOR_ENV})
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    return dict(json.loads(done.stdout))


def _nginx_groups() -> dict[int, list[str]]:
    """docker/nginx-sharded/upstreams.conf: shard -> its replicas' addresses."""
    text = (ROOT / "docker/nginx-sharded/upstreams.conf").read_text()
    return {int(i): re.findall(r"server (\S+);", body) for i, body in re.findall(r"upstream rice_group_(\d+) \{(.*?)\}", text, re.S)}


def test_the_sharded_profile_runs_two_shard_groups_behind_nginx() -> None:
    """Profile `sharded`: replica groups of RICE_SHARDS=2 on the same Redis as the default replicas,
    nginx routing shard i (server i of its hash upstream) to exactly the replicas with RICE_SHARD=i;
    the default stack is untouched by it."""
    from tools.sharded_proxy import config_groups

    assert not set(SHARDED) & set(_compose_config("docker-compose.yml")["services"]), "the sharded replicas belong to the profile only"
    services = _sharded_config("docker-compose.yml")["services"]
    assert {*SHARDED, "nginx", "redis"} <= set(services)
    plain = services["api-1"]["environment"]
    by_shard: dict[int, list[str]] = {}
    for name in SHARDED:
        api = services[name]
        env = api["environment"]
        assert env["RICE_SHARDS"] == "2" and int(env["RICE_SHARD"]) in (0, 1)
        assert {k: v for k, v in env.items() if k not in ("RICE_SHARDS", "RICE_SHARD")} == plain, "same settings as the default replicas"
        assert api["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "ports" not in api, "a shard group is reached through nginx only"
        by_shard.setdefault(int(env["RICE_SHARD"]), []).append(f"{name}:8000")
    assert sorted(by_shard) == [0, 1]
    assert config_groups() == [0, 1], "nginx's hash upstream must list the groups' listeners in shard order"
    assert {i: sorted(r) for i, r in _nginx_groups().items()} == {i: sorted(r) for i, r in by_shard.items()}
    nginx = services["nginx"]
    assert set(nginx["depends_on"]) == set(SHARDED)
    mounts = {v["source"]: v["target"] for v in nginx["volumes"]}
    conf = nginx["command"][nginx["command"].index("-c") + 1]
    assert mounts[str(ROOT / "docker/nginx-sharded.conf")] == conf
    assert mounts[str(ROOT / "docker/nginx-sharded")] == str(Path(conf).parent / "nginx-sharded"), "the included files sit beside it"
    listen = re.search(r"listen (\d+);", (ROOT / "docker/nginx-sharded/listen.conf").read_text())
    assert listen and [p["target"] for p in nginx["ports"]] == [int(listen.group(1))]
    cpu = _sharded_config("docker-compose.yml", "docker/compose.cpu.yml")["services"]
    for name in SHARDED:
        assert not cpu[name].get("deploy") and cpu[name]["build"]["args"]["VARIANT"] == "cpu"


def test_nginx_allows_the_services_upload_limits() -> None:
    """The proxy's body limits are the service's defaults (a smaller one would refuse uploads the
    service takes; past its own, the service answers 413 itself)."""
    from service.settings import Settings

    conf = (ROOT / "docker/nginx-sharded.conf").read_text()
    unit = {"m": 1024**2, "g": 1024**3}
    sizes = {
        m.group(3) or "RICE_MAX_UPLOAD_BYTES": int(m.group(1)) * unit[m.group(2)]
        for m in re.finditer(r"client_max_body_size (\d+)([mg]);(?:\s+# (RICE_\w+))?", conf)
    }
    defaults = {f"RICE_{name.upper()}": field.default for name, field in Settings.model_fields.items()}
    assert sizes == {k: defaults[k] for k in ("RICE_MAX_UPLOAD_BYTES", "RICE_MAX_BULK_BYTES", "RICE_MAX_JOB_UPLOAD_BYTES")}
