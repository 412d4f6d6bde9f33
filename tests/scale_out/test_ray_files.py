"""The shipped Ray files are valid without a cluster: Serve's own schema, real settings, promtool."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.settings import Settings

# ray is looked up here and imported by the tests that use it: collecting this file costs every worker nothing
NO_RAY = importlib.util.find_spec("ray") is None
pytestmark = [
    pytest.mark.skipif(NO_RAY, reason="ray is the optional extra: pip install -e '.[ray]'"),
    pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`"),  # Ray's own models, on import
]

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = yaml.safe_load((ROOT / "docker" / "ray-serve.yaml").read_text())
RAY_SERVICE = yaml.safe_load((ROOT / "docker" / "kuberay-rayservice.yaml").read_text())


@pytest.mark.parametrize(
    "config", [SERVE_CONFIG, yaml.safe_load(RAY_SERVICE["spec"]["serveConfigV2"])], ids=["serve", "kuberay"]
)
def test_serve_configs_validate_and_point_at_real_code_and_settings(config):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    (application,) = schema.applications
    module, attribute = application.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attribute))
    assert {d.name for d in application.deployments} == {"PiggybackReplica", "TaskRouter"}
    replicas = next(d for d in application.deployments if d.name == "PiggybackReplica")
    bounds = replicas.autoscaling_config
    assert bounds["min_replicas"] <= bounds["max_replicas"] and bounds["target_ongoing_requests"] > 0
    fields = {f"PIGGYBACK_{name.upper()}" for name in Settings.model_fields}
    variables = set(application.runtime_env["env_vars"])
    assert variables <= fields, variables - fields
    readme = (ROOT / "docs" / "configuration.md").read_text()
    assert all(variable in readme for variable in variables), [v for v in variables if v not in readme]


def test_rayservice_runs_token_auth_on_every_node():
    spec = RAY_SERVICE["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    assert RAY_SERVICE["kind"] == "RayService" and re.match(r"ray\.io/v1", RAY_SERVICE["apiVersion"])


def test_promtool_accepts_the_ray_prometheus_config():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    config = ROOT / "docker" / "prometheus-ray.yml"
    check = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
