"""A fresh checkout's `make serve` builds the ImageNet default and answers the README's curl example."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import sklearn

from tests.service.test_imagenet_task import torchvision_probabilities
from tests.support.servers import free_port, wait_ready

REPO = Path(__file__).resolve().parents[2]


def readme_curl_example() -> str:
    """The README's predict example, continuation lines joined."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    return next(line.strip() for line in text.splitlines() if line.strip().startswith("curl -s -F images=@"))


def fresh_checkout(dest: Path) -> None:
    """The project's files as a clone would have them (tracked and new, none ignored), with the test's venv."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    (dest / ".venv").symlink_to(Path(sys.prefix))  # the venv `make` would build: the one running this test


@pytest.mark.slow
def test_fresh_make_serve_answers_the_readme_example(tmp_path):
    clone = tmp_path / "clone"
    fresh_checkout(clone)
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    # -o: the venv exists already (building one would download torch)
    server = subprocess.Popen(
        ["make", "-o", ".venv/.installed", "serve", f"DEMO_DIR={tmp_path / 'demo'}"],
        cwd=clone, env={**os.environ, "PIGGYBACK_PORT": str(port)}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=1800, process=server)
        command = readme_curl_example().replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        answer = json.loads(subprocess.run(["sh", "-c", command], cwd=clone, capture_output=True, check=True).stdout)
        tasks = subprocess.run(["curl", "-s", f"http://127.0.0.1:{port}/tasks"], capture_output=True, check=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert "training demo task 'mnist'" in output and "epoch 1/" in output  # first run reports progress
    assert {t["name"] for t in json.loads(tasks.stdout)} >= {"imagenet", "mnist", "digits"}
    photo = Path(sklearn.__file__).parent / "datasets" / "images" / re.search(r"@\S*/(\w+\.jpg)", command)[1]
    reference = torchvision_probabilities(Path(tmp_path / "demo" / "mobilenet_v2-b0353104.pth"), photo)
    assert answer["task"] == "imagenet"
    assert [p["index"] for p in answer["predictions"][0]["top_k"]] == reference.topk(3).indices.tolist()
