"""The Ray quick start in docs/deploy.md, run as written: the first `sh` block under "Scale out (Ray Serve)".

A fresh bash (`-euo pipefail`: any failing line fails the test) with a fresh `HOME`, so no Ray token
exists yet, as on a new machine. It runs in a scratch directory holding what the README assumes: the
`.venv`, `docker/ray-serve.yaml` with its `PIGGYBACK_*` paths edited (as the README says to) to a test
backbone and a store with the task `mnist`, and `some_digit.png`. The block uses Ray's default ports,
so the test skips when one is taken; whatever happens, `ray stop --force` runs at the end.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mask_store import TaskStore, artifact_bytes
from tests.support.builders import random_task_artifact
from tests.support.servers import png_bytes

# ray is looked up, not imported: collecting this file costs every test worker nothing
NO_RAY = importlib.util.find_spec("ray") is None
pytestmark = [
    pytest.mark.slow,
    pytest.mark.serial,
    pytest.mark.skipif(NO_RAY, reason="ray is the optional extra: pip install -e '.[ray]'"),
]

ROOT = Path(__file__).resolve().parents[2]
HEADING = "## Scale out (Ray Serve)"
DEFAULT_PORTS = (6379, 8265, 8000, 10001, 52365)  # GCS, dashboard, Serve proxy, Ray client, dashboard agent


def quick_start() -> str:
    """The commands of the Ray quick start (docs/deploy.md), verbatim."""
    section = (ROOT / "docs" / "deploy.md").read_text().split(HEADING, 1)[1]
    return re.search(r"^```sh\n(.*?)^```", section, re.S | re.M).group(1)


def _taken(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def _scratch(tmp_path: Path, backbone_file: Path, resnet18) -> Path:
    """A directory with what the quick start expects the user to have: venv, edited config, a task, an image."""
    work = tmp_path / "work"
    (work / "docker").mkdir(parents=True)
    (work / ".venv").symlink_to(ROOT / ".venv")
    store = tmp_path / "store"
    TaskStore(store).put(artifact_bytes(random_task_artifact(resnet18, "resnet18", task="mnist", seed=0)))
    (work / "some_digit.png").write_bytes(png_bytes(0))
    config = yaml.safe_load((ROOT / "docker" / "ray-serve.yaml").read_text())
    application = config["applications"][0]
    application["runtime_env"]["env_vars"].update(
        PIGGYBACK_WEIGHTS=str(backbone_file), PIGGYBACK_STORE=str(store), PIGGYBACK_DEVICE="cpu"
    )
    for deployment in application["deployments"]:
        if deployment["name"] == "PiggybackReplica":  # "for a fixed N replace autoscaling_config with num_replicas"
            deployment.pop("autoscaling_config")
            deployment["num_replicas"] = 1
    (work / "docker" / "ray-serve.yaml").write_text(yaml.safe_dump(config))
    return work


def test_the_readme_ray_quick_start_runs_as_written(tmp_path, backbone_file, resnet18):
    commands = quick_start()
    assert "ray get-auth-token --generate" in commands and "ray stop" in commands
    if taken := [port for port in DEFAULT_PORTS if _taken(port)]:
        pytest.skip(f"the quick start uses Ray's default ports; taken here: {taken}")
    work = _scratch(tmp_path, backbone_file, resnet18)
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "RAY_USAGE_STATS_ENABLED": "0",  # no usage-stats prompt or upload; not a command the user types
    }
    shell = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", commands],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so a timeout kills every command it started
    )
    try:
        output, _ = shell.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(shell.pid, signal.SIGKILL)
        output, _ = shell.communicate()
        pytest.fail(f"the quick start did not finish in 300 s:\n{output[-4000:]}")
    finally:
        stop = [str(Path(sys.executable).parent / "ray"), "stop", "--force"]
        subprocess.run(stop, cwd=work, env=env, capture_output=True, timeout=120)
    assert shell.returncode == 0, output[-4000:]
    assert re.search(r"^x-piggyback-replica: \S+", output, re.M | re.I), output[-4000:]  # the predict's answer
    assert "RUNNING" in output, output[-4000:]  # `serve status`: the app is up
    assert (home / ".ray" / "auth_token").is_file()
    assert not _taken(6379), "`ray stop` left the head running"
