"""A third protocol is one new module in `service/routes` and nothing else: this test writes one (JSON
of base64 images in, labels out) outside the package, puts its folder on the package's path, and checks
that the unchanged app mounts it, runs it through the one data plane (same answers and metrics as
`/tasks`), words its errors with its own key (the app's handlers and the middleware read its
declaration), documents them in the OpenAPI document, and that the Ray router's questions see it."""

from __future__ import annotations

import base64
import sys
import textwrap

import pytest

import service.routes
from mask_store import TaskStore, artifact_bytes
from service.protocols import error_key_for, is_prediction, task_of
from tests.support.builders import random_task_artifact, server_settings
from tests.support.servers import png_bytes, serve_in_process

THIRD_DOOR = '''
"""JSON in, JSON out: {"images": [base64, ...]} -> {"labels": [...]}."""
import base64
import re

from fastapi import APIRouter
from pydantic import BaseModel

from service.deps import DataPlaneDep, DeadlineDep
from service.inference import EncodedImages
from service.protocols import Protocol

PROTOCOL = Protocol(
    name="echo",
    prefix="/echo",
    error_key="message",
    prediction=re.compile(r"^/echo/(?P<task>[^/]+)/classify$"),
    task_route=re.compile(r"^/echo/(?P<task>[^/]+)/"),
)
router = APIRouter(prefix="/echo", responses=PROTOCOL.errors(400, 404, 413, 503))


class Images(BaseModel):
    images: list[str]


@router.post("/{name}/classify")
async def classify(name: str, body: Images, plane: DataPlaneDep, deadline: DeadlineDep) -> dict:
    async def read(task):
        return EncodedImages([(f"images[{i}]", base64.b64decode(b)) for i, b in enumerate(body.images)])

    answer = await plane.predict(name, None, read, deadline)
    return {"task": answer.task.name, "labels": [ranked[0].label for ranked in answer.top_k(1)]}
'''


@pytest.fixture
def third_door(tmp_path, monkeypatch):
    """`echo.py` on `service.routes`' path, found by the app's discovery; removed again afterwards."""
    folder = tmp_path / "more_routes"
    folder.mkdir()
    (folder / "echo.py").write_text(textwrap.dedent(THIRD_DOOR))
    monkeypatch.setattr(service.routes, "__path__", [*service.routes.__path__, str(folder)])
    service.routes.route_modules.cache_clear()
    yield
    sys.modules.pop("service.routes.echo", None)
    monkeypatch.undo()
    service.routes.route_modules.cache_clear()


def test_a_third_protocol_is_one_route_module(third_door, tmp_path, backbone_file, resnet18):
    artifact = random_task_artifact(resnet18, "resnet18", task="alpha", labels=["cat", "dog", "eel"], seed=1)
    TaskStore(tmp_path / "store").put(artifact_bytes(artifact))
    settings = server_settings(backbone_file, tmp_path / "store", max_images_per_request=2)
    images = [png_bytes(seed) for seed in range(2)]
    with serve_in_process(settings) as client:  # the app as shipped, built after echo.py was put in place
        body = {"images": [base64.b64encode(image).decode() for image in images]}
        answer = client.post("/echo/alpha/classify", json=body)
        assert answer.status_code == 200, answer.text
        own = client.post("/tasks/alpha/predict", files=[("images", (f"{i}.png", im)) for i, im in enumerate(images)])
        assert answer.json()["labels"] == [p["label"] for p in own.json()["predictions"]]

        missing = client.post("/echo/nope/classify", json=body)
        assert missing.status_code == 404 and "nope" in missing.json()["message"]
        too_many = client.post("/echo/alpha/classify", json={"images": body["images"] * 2})
        assert too_many.status_code == 413 and "at most 2" in too_many.json()["message"]
        metrics = client.get("/metrics").text
        assert 'piggyback_request_latency_seconds_count{status="200",task="alpha"} 2.0' in metrics

        documented = client.get("/openapi.json").json()
        errors = documented["paths"]["/echo/{name}/classify"]["post"]["responses"]
        assert errors["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/EchoError")
        assert documented["components"]["schemas"]["EchoError"]["required"] == ["message"]

    # what the middleware and the Ray router ask, answered from the declaration alone
    assert error_key_for("/echo/alpha/classify") == "message"
    assert is_prediction("POST", "/echo/alpha/classify") and task_of("/echo/alpha/classify") == "alpha"
