"""What the README and docs/ tell a newcomer to run, run as written, and the start-up refusals they describe.

Each test holds one place where following the docs verbatim used to trip: the admin token exported for
the shell (not for `make` alone), `register` after `train --register`, reproducible bytes, configuration
that ends `python -m service` in one line instead of a replica unready for good, `--out` named in its
own errors, defaults that serve the demo, `make serve` saying what it serves, settings named as
variables, and a configuration table that lists every setting.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch
from pydantic import ValidationError

from mask_store import BackboneLayout, TaskStore, artifact_bytes, build_backbone, offline_weights, save_artifact
from mask_store.synthetic import random_task_artifact
from service.settings import DEMO_STORE, DEMO_WEIGHTS, Settings
from tests.support.builders import ADMIN_TOKEN, run_cli, server_settings, write_folder
from tests.support.servers import free_port, readiness_saying, run_as_group, serve_in_thread, stop_process, wait_ready
from training.cli import cmd_register
from training.demo import DEMO_ARCH, DEMO_PREPROCESS

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any PIGGYBACK_* (a newcomer's shell), plus `extra`."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PIGGYBACK_")} | extra


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M)


# --- 1: the admin token is exported, so the commands after `make serve` see it ----------------------------
def test_the_readme_exports_the_token_before_the_server_and_the_training_read_it():
    blocks = sh_blocks(README)
    serve = next(b for b in blocks if "make serve" in b and "PIGGYBACK_ADMIN_TOKEN" in b)
    train = next(b for b in blocks if "python -m training train" in b)
    assert serve.splitlines()[0] == "export PIGGYBACK_ADMIN_TOKEN=$(openssl rand -hex 32)"
    assert README.index(serve) < README.index(train)
    assert "--register http://127.0.0.1:8000" in train and "--token" not in train
    assert "PIGGYBACK_ADMIN_TOKEN=$(openssl rand -hex 32) make serve" not in README


@pytest.mark.slow  # a real server process
def test_an_exported_token_reaches_a_server_and_a_register_started_after_it(tmp_path, backbone_file, resnet18):
    """The README's export line, verbatim, in a fresh shell; then, as the README does, a server and the
    training CLI started from that shell (here the test backbone and `register`, which reads the token
    exactly as `train --register` does)."""
    export = next(line for line in README.splitlines() if line.startswith("export PIGGYBACK_ADMIN_TOKEN="))
    artifact = tmp_path / "t.safetensors"
    save_artifact(random_task_artifact(resnet18, "resnet18", task="exported"), artifact)
    port = free_port()
    script = f"""set -euo pipefail
{export}
PIGGYBACK_BACKBONE=resnet18 PIGGYBACK_WEIGHTS={backbone_file} PIGGYBACK_STORE={tmp_path / "store"} \\
PIGGYBACK_PORT={port} PIGGYBACK_DEVICE=cpu PIGGYBACK_LOG_LEVEL=warning {sys.executable} -m service &
trap 'kill %1' EXIT
until curl -sf http://127.0.0.1:{port}/readyz >/dev/null; do sleep 0.2; done
{sys.executable} -m training register {artifact} --url http://127.0.0.1:{port}
"""
    done = run_as_group(["bash", "-c", script], env=clean_env(), timeout=180)  # the server goes with the shell
    assert done.returncode == 0, done.stderr
    assert f"registered task exported version 1 at http://127.0.0.1:{port}" in done.stdout


def test_register_without_a_token_says_every_place_it_can_come_from(capsys, monkeypatch, tmp_path, backbone_file):
    monkeypatch.delenv("PIGGYBACK_ADMIN_TOKEN", raising=False)
    argv = ["train", "--backbone", "resnet18", "--weights", str(backbone_file), "--data", str(tmp_path),
            "--task", "t", "--out", str(tmp_path / "t.safetensors"), "--register", "http://127.0.0.1:8000"]  # fmt: skip
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for word in ("--register needs", "--token", "--token-file", "export PIGGYBACK_ADMIN_TOKEN", "make alone"):
        assert word in err, err


# --- 2: register after train --register, and a version that is not higher ---------------------------------
def test_registering_the_same_artifact_again_says_it_was_live_and_a_lower_version_says_to_retrain(
    capsys, tmp_path, backbone_file, resnet18
):
    first, other = tmp_path / "first.safetensors", tmp_path / "other.safetensors"
    save_artifact(random_task_artifact(resnet18, "resnet18", task="again", version=5, seed=1), first)
    save_artifact(random_task_artifact(resnet18, "resnet18", task="again", version=5, seed=2), other)
    with serve_in_thread(server_settings(backbone_file, tmp_path / "store")) as base:
        register = ["register", "--url", base, "--token", ADMIN_TOKEN]
        code, out, err = run_cli(capsys, register[0], str(first), *register[1:])
        assert code == 0 and out.strip() == f"registered task again version 5 at {base}", err
        code, out, err = run_cli(capsys, register[0], str(first), *register[1:])  # right after: a retry
        assert code == 0 and "already live there (this very artifact)" in out, err

        code, out, err = run_cli(capsys, register[0], str(other), *register[1:])
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert "409" in err and "not higher than its live version 5" in err
        assert "train it again with --version 6 or higher, then register that file" in err
        assert "upload it with --version" not in err  # register has no such option

        with pytest.raises(SystemExit) as trained:  # the same refusal after `train --register`
            cmd_register(other.read_bytes(), base, ADMIN_TOKEN, kept=other, trained=True)
        assert "train again with --version 6 or higher" in str(trained.value.code)
    readme = " ".join(README.split())
    assert "later, or again" not in readme and "was already live" in readme


# --- 3: the same --version and seed write the same bytes ---------------------------------------------------
@pytest.mark.slow  # two real training runs (a few seconds each)
def test_two_train_runs_with_the_same_version_and_seed_write_identical_bytes(tmp_path, backbone_file):
    assert "(the same `--version` included) and seed" in " ".join((DOCS / "training.md").read_text().split())
    data = write_folder(tmp_path / "data", train=4, val=4)
    outputs = []
    for run in ("first", "second"):
        out = tmp_path / f"{run}.safetensors"
        command = (f"{sys.executable} -m training train --backbone resnet18 --weights {backbone_file} --data {data} "
                   f"--task same --out {out} --version 7 --seed 3 --epochs 1 --image-size 16 --grayscale "
                   "--augment none --batch-size 4 --no-progress")  # fmt: skip
        done = subprocess.run(["bash", "-c", command], env=clean_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


# --- 4 and 8: what no retry can fix ends `python -m service` in one line; a store that does not answer waits --
def _service(env: dict[str, str], cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    base = clean_env(PIGGYBACK_PORT=str(free_port()), PIGGYBACK_LOG_LEVEL="warning")
    return subprocess.run(
        [sys.executable, "-m", "service"], env=base | env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


PREFLIGHT = [  # refused before the server binds a port: stderr is exactly one line
    ({"PIGGYBACK_STORE_POLL_S": "soon"}, "PIGGYBACK_STORE_POLL_S"),
    ({"PIGGYBACK_MAX_IMAGE_BYTES": "8 MB"}, "PIGGYBACK_MAX_IMAGE_BYTES"),
    ({"PIGGYBACK_LOG_LEVEL": "loud"}, "PIGGYBACK_LOG_LEVEL"),
    ({"PIGGYBACK_HOST": "no-such-host.invalid"}, "PIGGYBACK_HOST"),
    ({"PIGGYBACK_BACKBONE": "resnet9000"}, "PIGGYBACK_BACKBONE"),
    ({"PIGGYBACK_WEIGHTS": "/no/such/backbone.pt"}, "PIGGYBACK_WEIGHTS"),
    ({"PIGGYBACK_WEIGHTS": "IMAGENET1K_V9"}, "PIGGYBACK_WEIGHTS"),
    ({"PIGGYBACK_DEVICE": "cuda"}, "PIGGYBACK_DEVICE"),
    ({"PIGGYBACK_KERNEL": "triton", "PIGGYBACK_DEVICE": "cpu"}, "PIGGYBACK_KERNEL"),
    ({"PIGGYBACK_STORE": "s3:///no-bucket"}, "PIGGYBACK_STORE"),
]


@pytest.mark.parametrize("env,variable", PREFLIGHT, ids=["-".join(env.values()) for env, _ in PREFLIGHT])
@pytest.mark.slow
def test_a_configuration_no_retry_can_fix_ends_the_start_in_one_line(env, variable, tmp_path, backbone_file):
    if variable == "PIGGYBACK_DEVICE" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    full = {"PIGGYBACK_BACKBONE": "resnet18", "PIGGYBACK_WEIGHTS": str(backbone_file),
            "PIGGYBACK_STORE": str(tmp_path / "store"), **env}  # fmt: skip
    started = time.monotonic()
    done = _service(full)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert variable in lines[0] and "Traceback" not in done.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "store").exists()  # nothing was started


@pytest.mark.slow
def test_weights_that_cannot_be_loaded_end_the_start_in_one_line(tmp_path, backbone_file):
    """Found while the backbone loads: the last line names the variable, no traceback, exit 2."""
    garbage = tmp_path / "backbone.pt"
    garbage.write_bytes(b"not a state_dict")
    cases = [
        ({"PIGGYBACK_WEIGHTS": str(garbage)}, "not a plain state_dict"),
        ({"PIGGYBACK_WEIGHTS": str(backbone_file), "PIGGYBACK_BACKBONE": "mobilenet_v2"}, "does not fit"),
        # a torchvision weights name offline: the download fails (a proxy that refuses stands in for no internet)
        (
            {
                "PIGGYBACK_WEIGHTS": "IMAGENET1K_V1",
                "TORCH_HOME": str(tmp_path / "hub"),
                "https_proxy": "http://127.0.0.1:9",
                "HTTPS_PROXY": "http://127.0.0.1:9",
            },
            "needs the internet",
        ),
    ]
    for env, words in cases:
        full = {"PIGGYBACK_BACKBONE": "resnet18", "PIGGYBACK_STORE": str(tmp_path / "store"), **env}
        done = _service(full)
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 2, done.stderr
        assert last.startswith("cannot start: PIGGYBACK_WEIGHTS=") and words in last, done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.slow  # a real server process waiting for its bucket
def test_a_missing_bucket_is_waited_for_and_readiness_says_why(s3_env, tmp_path, backbone_file):
    import boto3

    bucket = f"later-{uuid.uuid4().hex[:12]}"
    port = free_port()
    env = clean_env(PIGGYBACK_BACKBONE="resnet18", PIGGYBACK_WEIGHTS=str(backbone_file),
                    PIGGYBACK_STORE=f"s3://{bucket}/tasks", PIGGYBACK_PORT=str(port), PIGGYBACK_DEVICE="cpu",
                    PIGGYBACK_LOG_LEVEL="warning")  # fmt: skip
    log = (tmp_path / "stderr").open("w")
    process = subprocess.Popen([sys.executable, "-m", "service"], env=env, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        answer = readiness_saying(base, "waiting for the store", process)
        assert process.poll() is None, "the server exited instead of waiting for its store"
        assert answer is not None and answer.status_code == 503
        assert f"bucket '{bucket}' does not exist" in answer.json()["detail"] and "PIGGYBACK_STORE" in answer.text
        assert httpx.get(f"{base}/healthz").status_code == 200
        region = os.environ["AWS_REGION"]
        where = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        boto3.client("s3").create_bucket(Bucket=bucket, **where)  # the operator fixes it
        wait_ready(base, timeout=60, process=process)
    finally:
        stop_process(process, grace_s=30)
        log.close()
    assert "Traceback" not in (tmp_path / "stderr").read_text()


# --- 5: a bucket from --out is named as --out ---------------------------------------------------------------
def test_a_missing_bucket_in_out_is_named_as_out(capsys, s3_env, tmp_path, backbone_file):
    argv = ["train", "--backbone", "resnet18", "--weights", str(backbone_file), "--data", str(tmp_path),
            "--task", "t", "--out", "s3://nope/x"]  # fmt: skip
    code, out, err = run_cli(capsys, *argv)
    assert code != 0 and "bucket 'nope' does not exist" in err and "fix the bucket in --out" in err, err
    assert "PIGGYBACK_STORE" not in err and "epoch" not in out


# --- 6: `python -m service` with its defaults serves the demo ------------------------------------------------
def test_the_default_settings_are_the_demo_that_make_builds(monkeypatch):
    for name in list(os.environ):
        if name.startswith("PIGGYBACK_"):
            monkeypatch.delenv(name)
    settings = Settings()
    makefile = (ROOT / "Makefile").read_text()
    demo_dir = re.search(r"^DEMO_DIR \?= (\S+)", makefile, re.M)[1]
    demo_weights = re.search(r"^DEMO_WEIGHTS := (\S+)", makefile, re.M)[1].replace("$(DEMO_DIR)", demo_dir)
    assert settings.backbone == DEMO_ARCH
    assert settings.weights == DEMO_WEIGHTS == demo_weights
    assert settings.store == DEMO_STORE == f"{demo_dir}/store"


@pytest.mark.slow  # a real server process with the ImageNet mobilenet_v2
def test_python_m_service_with_no_settings_serves_the_demo_store(tmp_path):
    """In a directory laid out as `make demo` leaves it, `python -m service` with no PIGGYBACK_* at all
    serves the demo's tasks (before, the default resnet18 refused every one as another backbone's)."""
    weights = tmp_path / DEMO_WEIGHTS
    weights.parent.mkdir(parents=True)
    shutil.copyfile(offline_weights(DEMO_ARCH), weights)
    backbone = build_backbone(DEMO_ARCH, weights)
    layout = BackboneLayout.from_model(DEMO_ARCH, backbone)
    labels = [str(d) for d in range(10)]
    artifact = random_task_artifact(
        backbone, DEMO_ARCH, task="digits", labels=labels, layout=layout, preprocess=DEMO_PREPROCESS
    )
    TaskStore(tmp_path / DEMO_STORE).put(artifact_bytes(artifact), layout)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "service"], cwd=tmp_path, env=clean_env(PIGGYBACK_PORT=str(port)))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout=120, process=process)
        ready = httpx.get(f"{base}/readyz").json()
        assert not ready.get("failed_tasks"), ready
        assert httpx.get(f"{base}/tasks/digits").status_code == 200
    finally:
        stop_process(process, grace_s=30)


# --- 7: `make serve` says which store it serves -------------------------------------------------------------
@pytest.mark.parametrize("store", [None, "s3://elsewhere/tasks"])
def test_make_serve_says_which_store_it_serves(store):
    if shutil.which("make") is None:
        pytest.skip("no make")
    env = clean_env(**({"PIGGYBACK_STORE": store} if store else {}))
    # -o: neither the venv nor the demo is rebuilt; PY=true: the recipe runs, the server does not
    done = subprocess.run(["make", "-s", "-o", ".venv/.installed", "-o", "demo", "serve", "PY=true"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    served = f"PIGGYBACK_STORE={store or '.cache/demo/store'}"
    assert "serving PIGGYBACK_BACKBONE=mobilenet_v2" in done.stdout and served in done.stdout, done.stdout
    assert ("are not served" in done.stdout) == (store is not None)
    assert "demo ready" not in (ROOT / "training" / "demo.py").read_text()  # the demo says what it built


# --- 8: sizes written as the docs write them ----------------------------------------------------------------
@pytest.mark.parametrize(
    "text,size", [("8388608", 8388608), ("8MiB", 8388608), ("8 MiB", 8388608), ("512 KiB", 524288), ("1GiB", 1 << 30)]
)
def test_sizes_are_read_as_written(monkeypatch, text, size):
    monkeypatch.setenv("PIGGYBACK_MAX_IMAGE_BYTES", text)
    assert Settings().max_image_bytes == size
    assert Settings(max_request_bytes=text).max_request_bytes == size


def test_a_decimal_size_is_refused_naming_the_units():
    with pytest.raises(ValidationError, match="binary unit"):
        Settings(max_artifact_bytes="1 GB")


# --- 10: the configuration page lists every setting ---------------------------------------------------------
def test_every_setting_is_a_row_of_the_configuration_table():
    text = (DOCS / "configuration.md").read_text()
    rows = set(re.findall(r"^\| `(PIGGYBACK_[A-Z_]+)` \|", text, re.M))
    assert rows == {f"PIGGYBACK_{name.upper()}" for name in Settings.model_fields}
    backbone_row = next(line for line in text.splitlines() if line.startswith("| `PIGGYBACK_BACKBONE` |"))
    assert f"| `{Settings.model_fields['backbone'].default}` |" in backbone_row
