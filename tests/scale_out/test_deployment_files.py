"""What can be checked of docker/ and docker-compose.yml without a Docker engine."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()
DEPLOY = (ROOT / "docs" / "deploy.md").read_text()


def test_compose_parses_and_wires_service_and_prometheus():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service, prometheus = compose["services"]["piggyback"], compose["services"]["prometheus"]
    assert (ROOT / service["build"]["dockerfile"]).is_file()
    assert service["ports"] == ["127.0.0.1:8000:8000"]
    assert any(v.startswith("piggyback-store:") for v in service["volumes"]) and "piggyback-store" in compose["volumes"]
    config_mount = next(v for v in prometheus["volumes"] if "prometheus.yml" in v)
    assert (ROOT / config_mount.split(":")[0]).is_file()
    scrape = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["piggyback:8000"]


def test_every_piggyback_variable_is_a_real_setting_and_documented():
    fields = {f"PIGGYBACK_{name.upper()}" for name in Settings.model_fields}
    shell_only = {"PIGGYBACK_DEMO"}  # read by docker/entrypoint.sh, not by the server
    texts = [
        (ROOT / "docker-compose.yml").read_text(),
        *(p.read_text() for p in (ROOT / "docker").glob("Dockerfile.*")),
    ]
    used = set().union(*(re.findall(r"PIGGYBACK_[A-Z_]+", text) for text in texts))
    assert used - shell_only <= fields, used - shell_only - fields
    for variable in used - shell_only:
        assert variable in CONFIGURATION, f"{variable} is not documented in docs/configuration.md"


def test_readme_commands_match_the_repository():
    assert "`make serve`" in README and "`make test`" in README and "docker compose up --build" in DEPLOY
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^serve:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    entrypoint = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert "python -m training demo" in entrypoint and "python -m service" in entrypoint


def test_promtool_accepts_the_prometheus_config(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    check = subprocess.run(
        [promtool, "check", "config", str(ROOT / "docker" / "prometheus.yml")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
