"""The Grafana dashboard in docker/: it parses, is provisioned by docker-compose, its queries are valid
PromQL (promtool) and every metric it queries is exposed by a real server's /metrics."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mask_store import TaskStore, artifact_bytes
from tests.support.builders import random_task_artifact, server_settings
from tests.support.servers import png_bytes, serve_in_thread

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "piggyback-serve.json"
METRIC = re.compile(r"\bpiggyback_[a-z0-9_]+\b")


def dashboard_targets() -> list[dict]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target for panel in dashboard["panels"] for target in panel.get("targets", [])]


@pytest.fixture(scope="module")
def exposed_samples(tmp_path_factory, backbone_file, resnet18) -> set[str]:
    """Sample names on /metrics of a real server after it served, refused and failed a few requests."""
    store = tmp_path_factory.mktemp("store")
    TaskStore(store).put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task="alpha")))
    with serve_in_thread(server_settings(backbone_file, store)) as base:
        image = ("images", ("a.png", png_bytes(), "image/png"))
        assert httpx.post(f"{base}/tasks/alpha/predict", files=[image]).status_code == 200
        assert httpx.post(f"{base}/tasks/nope/predict", files=[image]).status_code == 404
        tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(png_bytes()).decode()]}
        assert httpx.post(f"{base}/v2/models/alpha/infer", json={"inputs": [tensor]}).status_code == 200
        text = httpx.get(f"{base}/metrics").text
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_dashboard_parses_and_covers_the_issue():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("requests per second", "p50", "p99", "queue wait", "batch size", "cache hit", "errors", "refusals"):
        assert topic in titles, topic
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid and all(t["datasource"]["uid"] == uid for t in panel["targets"])


def test_every_queried_metric_exists_on_a_real_server(exposed_samples):
    queried = {name for target in dashboard_targets() for name in METRIC.findall(target["expr"])}
    assert len(queried) >= 8
    assert queried <= exposed_samples, sorted(queried - exposed_samples)


def test_every_query_is_valid_promql(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool missing in CI: `make test` installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    rules = [
        {"record": f"dashboard:query_{i}", "expr": target["expr"].replace("$__rate_interval", "1m")}
        for i, target in enumerate(dashboard_targets())
    ]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_compose_provisions_grafana_next_to_prometheus():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    assert "prometheus" in grafana["depends_on"] and grafana["ports"] == ["127.0.0.1:3000:3000"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"] if volume.startswith("./"))
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "piggyback.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert mounts["./docker/grafana/dashboards"] == dashboards_path
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_path}/{DASHBOARD.name}"
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
