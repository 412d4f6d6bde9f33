"""The training CLI's admin token and server URL (issue 18): the token also comes from a file or
PIGGYBACK_ADMIN_TOKEN, so it stays out of the process list; a token no header can carry and a malformed
URL are one line and exit status 2 before training; uploading the artifact the server already serves (its
store is the one `--out s3://` published to) succeeds, and another artifact at that version is a 409.

The server is `python -m service` as a process over a store on a real S3 server (moto); the commands
that talk to it run as `python -m training` processes (both forked: `tests.support.forked`). The
refusals before anything runs call the CLI's `main` in this process (what they hold is the CLI's own
checks, not the interpreter start).
"""

from __future__ import annotations

import os
import subprocess
import uuid

import httpx
import pytest

from mask_store import TaskStore, load_artifact, save_artifact
from mask_store.artifact import artifact_identity
from mask_store.synthetic import random_task_artifact
from tests.support.builders import ADMIN_TOKEN, run_cli, run_training_cli, write_digits_imagefolder
from tests.support.forked import TRAINING, run_forked
from tests.support.servers import service_process

TOKEN_VARIABLE = "PIGGYBACK_ADMIN_TOKEN"


def training_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m training ARGV`; `env` replaces PIGGYBACK_ADMIN_TOKEN (None: left unset)."""
    full_env = {k: v for k, v in os.environ.items() if k != TOKEN_VARIABLE} | (env or {})
    return run_forked(TRAINING, list(argv), full_env, timeout=300)


def assert_one_line_error(done: subprocess.CompletedProcess, code: int, *words: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("error: ") and all(word in lines[0] for word in words), done.stderr


@pytest.fixture(scope="module")
def s3_server_store(s3_server, backbone_file):
    """(base URL, store location): one `python -m service` whose store is a fresh prefix on the S3 server."""
    location = f"s3://{s3_server.bucket}/{uuid.uuid4().hex}"
    env = {
        **s3_server.env(AWS_EC2_METADATA_DISABLED="true"),
        "PIGGYBACK_BACKBONE": "resnet18",
        "PIGGYBACK_WEIGHTS": str(backbone_file),
        "PIGGYBACK_STORE": location,
        "PIGGYBACK_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    with service_process(env, timeout=300) as base:
        yield base, location


@pytest.fixture(scope="module")
def artifact_file(tmp_path_factory, resnet18):
    path = tmp_path_factory.mktemp("artifact") / "t.safetensors"
    save_artifact(random_task_artifact(resnet18, "resnet18"), path)
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    write_digits_imagefolder(root, count=100)
    return root


@pytest.mark.slow
def test_train_publishing_to_the_servers_own_store_says_it_is_served(s3_env, s3_server_store, tiny_data, backbone_file):
    base, location = s3_server_store
    done = run_training_cli(
        backbone_file, tiny_data, "published-first", location, "--version", "3", "--register", base,
        "--token", ADMIN_TOKEN,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"published to {location}" in done.stdout
    assert f"registered task published-first version 3 at {base}" in done.stdout, done.stdout
    served = httpx.get(f"{base}/tasks/published-first").json()
    assert served["identity"] == artifact_identity(TaskStore(location).manifest("published-first"))


@pytest.mark.slow
def test_token_from_a_file_or_the_environment_and_registering_again(
    capsys, monkeypatch, s3_server_store, resnet18, tmp_path
):
    base, _ = s3_server_store
    first, other = tmp_path / "first.safetensors", tmp_path / "other.safetensors"
    save_artifact(random_task_artifact(resnet18, "resnet18", task="by-file", version=2, seed=1), first)
    save_artifact(random_task_artifact(resnet18, "resnet18", task="by-file", version=2, seed=2), other)
    token_file = tmp_path / "token"
    token_file.write_text(f"  {ADMIN_TOKEN}\n")  # as `echo` or a mounted secret writes it

    wrong = {TOKEN_VARIABLE: "wrong-token-0123456789"}  # --token-file comes first
    done = training_cli("register", str(first), "--url", base, "--token-file", str(token_file), env=wrong)
    assert done.returncode == 0 and "registered task by-file version 2" in done.stdout, done.stderr

    monkeypatch.setenv(TOKEN_VARIABLE, ADMIN_TOKEN)  # from here on in this process: the token from the environment
    argv = ["register", str(first), "--url", base]
    done = subprocess.CompletedProcess(argv, *run_cli(capsys, *argv))  # the same artifact again: a retry
    assert done.returncode == 0 and "registered task by-file version 2" in done.stdout, done.stderr

    argv = ["register", str(other), "--url", base]
    done = subprocess.CompletedProcess(argv, *run_cli(capsys, *argv))  # another artifact, same version
    assert_one_line_error(done, 1, "409", "not higher than its live version 2", str(other))
    assert httpx.get(f"{base}/tasks/by-file").json()["identity"] == artifact_identity(load_artifact(first).manifest)


@pytest.mark.parametrize(
    "command,extra,env,words",
    [
        ("train", ["--register", "http://[::1", "--token", ADMIN_TOKEN], None, ["'http://[::1'", "malformed"]),
        ("train", ["--register", "http://127.0.0.1:9", "--token", "tökén-0123456789"], None, ["--token", "non-ASCII"]),
        ("train", ["--register", "http://127.0.0.1:9", "--token-file", "{missing}"], None, ["--token-file", "read"]),
        ("train", ["--register", "http://127.0.0.1:9"], {TOKEN_VARIABLE: " "}, [TOKEN_VARIABLE, "empty"]),
        ("train", ["--register", "http://127.0.0.1:9"], None, [TOKEN_VARIABLE, "--token-file"]),
        ("register", ["--url", "http://[::1", "--token", ADMIN_TOKEN], None, ["malformed"]),
        ("register", ["--url", "ftp://127.0.0.1:9", "--token", ADMIN_TOKEN], None, ["http://"]),
        ("register", ["--url", "http://127.0.0.1:9", "--token-file", "{latin1}"], None, ["--token-file", "non-ASCII"]),
    ],
)
def test_bad_token_or_url_is_one_line_and_status_2_before_anything_runs(
    capsys, monkeypatch, tmp_path, tiny_data, backbone_file, artifact_file, command, extra, env, words
):
    (tmp_path / "latin1").write_bytes("geheim-schlüssel-0123".encode("latin-1"))
    extra = [arg.format(missing=tmp_path / "missing", latin1=tmp_path / "latin1") for arg in extra]
    out = tmp_path / "task.safetensors"  # train must not write it
    if command == "train":
        argv = ["train", "--backbone", "resnet18", "--weights", str(backbone_file), "--data", str(tiny_data),
                "--task", "t", "--out", str(out), "--epochs", "1", "--image-size", "16", "--grayscale",
                "--no-progress", *extra]  # fmt: skip
    else:
        argv = ["register", str(artifact_file), *extra]
    monkeypatch.delenv(TOKEN_VARIABLE, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    done = subprocess.CompletedProcess(argv, *run_cli(capsys, *argv))
    assert_one_line_error(done, 2, *words)
    assert "epoch" not in done.stdout and not out.exists()
    assert "tökén" not in done.stderr and "schlüssel" not in done.stderr  # a secret is never echoed
