"""The operator's view: the Grafana dashboard has an instance selector and panels for readiness,
auth failures, batch and decoder errors, the top-1 score distribution and the no-match rate; the
Prometheus alert rules are provisioned with the stack and query only metrics the service exports,
with the label values it really uses."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from fastapi.testclient import TestClient

from tests.test_deploy import _compose_config, _exported_samples

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docker/grafana/dashboards/rice.json"
ALERTS = ROOT / "docker/alerts.yml"


def _panels() -> list[dict[str, Any]]:
    return list(json.loads(DASHBOARD.read_text())["panels"])


def _metrics(expr: str) -> set[str]:
    return set(re.findall(r"\brice_[a-z0-9_]+", expr))


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_dashboard_has_an_instance_selector_used_by_every_query() -> None:
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    instance = next(v for v in variables if v["name"] == "instance")
    assert instance["type"] == "query" and "rice_ready" in instance["definition"] and instance["includeAll"]
    for panel in _panels():
        for target in panel["targets"]:
            for m in re.finditer(r"\brice_[a-z0-9_]+(\{[^}]*\})?", target["expr"]):
                assert m.group(1) and 'instance=~"$instance"' in m.group(1), f"{panel['title']}: {target['expr']}"


def test_dashboard_covers_health_security_errors_and_quality() -> None:
    queried = {m for p in _panels() for t in p["targets"] for m in _metrics(t["expr"])}
    wanted = {
        "rice_ready",  # readiness
        "rice_auth_failures_total",  # 401/403
        "rice_batch_errors_total",  # encoder batches that raised
        "rice_errors_total",  # decoder errors, by code
        "rice_top1_score_bucket",  # recognition quality: top-1 score distribution
        "rice_recognitions_total",  # the no-match rate
        "rice_gallery_other_namespace_items",  # the model-switch trap
    }
    assert wanted <= queried, sorted(wanted - queried)
    decoder = [t["expr"] for p in _panels() for t in p["targets"] if "rice_errors_total" in t["expr"]]
    assert any("invalid_media" in e and "unsupported_media" in e for e in decoder)
    assert any(p["type"] == "heatmap" and "rice_top1_score_bucket" in p["targets"][0]["expr"] for p in _panels())
    assert len({p["id"] for p in _panels()}) == len(_panels())


def test_alert_rules_are_provisioned_with_the_stack() -> None:
    scrape = yaml.safe_load((ROOT / "docker/prometheus.yml").read_text())
    assert scrape["rule_files"] == ["/etc/prometheus/alerts.yml"]
    prometheus = _compose_config("docker-compose.yml")["services"]["prometheus"]
    mounts = {v["target"]: v["source"] for v in prometheus["volumes"] if v["type"] == "bind"}
    assert Path(mounts["/etc/prometheus/alerts.yml"]) == ALERTS


def test_alert_rules_query_what_the_service_exports(client: TestClient) -> None:
    rules = _rules()
    names = {r["alert"] for r in rules}
    assert {"RiceNotReady", "RiceHighErrorRate", "RiceReplicaLagging", "RiceOverloaded"} <= names
    for r in rules:
        assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
    client.get("/no-such-page")  # one counted request: its status label shows the format the rules match
    text = client.get("/metrics").text
    exported = _exported_samples(text)
    queried = {m for r in rules for m in _metrics(r["expr"])}
    assert queried and queried <= exported, sorted(queried - exported)
    assert re.search(r'rice_requests_total\{[^}]*status="404"', text)  # three-digit strings: "429" and "5.." match them
