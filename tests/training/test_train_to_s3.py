"""`python -m training train --out s3://bucket/prefix` publishes the task to a store on a real S3 server
(moto), and `--register` still uploads it to a running server; a bad bucket fails before training."""

from __future__ import annotations

import httpx
import pytest

from mask_store import TaskStore
from tests.support.builders import ADMIN_TOKEN, run_training_cli, server_settings, write_digits_imagefolder
from tests.support.servers import serve_in_thread


@pytest.mark.slow
def test_train_publishes_to_s3_and_registers(s3_env, tmp_path, backbone_file):
    write_digits_imagefolder(tmp_path / "data", count=120)
    location = f"s3://{s3_env.bucket}/trained"
    with serve_in_thread(server_settings(backbone_file, tmp_path / "server-store")) as base:
        done = run_training_cli(
            backbone_file, tmp_path / "data", "digits-s3", location, "--version", "3",
            "--register", base, "--token", ADMIN_TOKEN,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"published to {location}" in done.stdout
        served = httpx.get(f"{base}/tasks/digits-s3").json()
    store = TaskStore(location)
    assert store.versions("digits-s3") == [3]
    assert store.get("digits-s3").manifest.labels == tuple(served["labels"]) and served["version"] == 3


@pytest.mark.slow
def test_a_missing_bucket_is_refused_before_training(s3_env, tmp_path, backbone_file):
    write_digits_imagefolder(tmp_path / "data", count=40)
    done = run_training_cli(backbone_file, tmp_path / "data", "t", "s3://no-such-bucket/x")
    assert done.returncode != 0
    assert "PIGGYBACK_STORE" in done.stderr or "bucket" in done.stderr
    assert "epoch" not in done.stdout and "Traceback" not in done.stderr
