"""End to end: the real server process, an artifact from the training CLI registered with --register."""

from __future__ import annotations

import io

import httpx
import pytest
import torch
from PIL import Image

from mask_store import build_backbone, load_artifact, replace_head
from tests.support.builders import ADMIN_TOKEN, run_training_cli, write_digits_imagefolder
from tests.support.reference_model import dedicated_network, expected_probabilities
from tests.support.servers import start_service, stop_process


@pytest.fixture
def server_process(tmp_path):
    model = build_backbone("resnet18")
    replace_head(model, 10)
    torch.save(model.state_dict(), tmp_path / "bb.pt")
    process, port = start_service(tmp_path / "store", tmp_path / "bb.pt", log_level="info")
    try:
        yield f"http://127.0.0.1:{port}", tmp_path, model
    finally:
        output = stop_process(process, grace_s=30)
        # graceful shutdown on SIGTERM (uvicorn re-raises the signal once it has shut down cleanly)
        assert process.returncode in (0, -15) and "Application shutdown complete" in output, output


@pytest.mark.slow
def test_cli_artifact_registered_live_answers_like_a_dedicated_network(server_process):
    base, tmp_path, backbone = server_process
    assert httpx.get(f"{base}/tasks").json() == []
    write_digits_imagefolder(tmp_path / "data", seed=1)
    out = tmp_path / "digits.safetensors"
    run = run_training_cli(
        tmp_path / "bb.pt",
        tmp_path / "data",
        "digits",
        out,
        "--per-task-bn",
        "--register",
        base,
        "--token",
        ADMIN_TOKEN,
    )
    assert run.returncode == 0, run.stderr
    assert "registered task digits" in run.stdout

    pngs = sorted((tmp_path / "data" / "val").rglob("*.png"))[:6]
    response = httpx.post(
        f"{base}/tasks/digits/predict",
        files=[("images", (p.name, p.read_bytes(), "image/png")) for p in pngs],
        params={"top_k": 10},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    artifact = load_artifact(out)
    expected = expected_probabilities(
        dedicated_network(backbone, artifact), artifact, [Image.open(io.BytesIO(p.read_bytes())) for p in pngs]
    )
    for prediction, row in zip(response.json()["predictions"], expected, strict=True):
        got = torch.zeros(10)
        for item in prediction["top_k"]:
            got[item["index"]] = item["score"]
        torch.testing.assert_close(got, row, rtol=1e-4, atol=1e-5)
        assert prediction["label"] == artifact.manifest.labels[int(row.argmax())]
