"""The Open Inference Protocol (KServe V2) REST routes: each registered task is a model.

A thin translation layer onto the same data plane as `POST /tasks/{name}/predict`: images are
decoded by `images_to_batch` and run through `batcher.predict`, so limits, batching, deadlines and
metrics are shared. Every error on these routes, whatever raised it, leaves as the protocol's
`{"error": "..."}` with the status `service.errors.status_for` gives it, in one place: `V2Route`.

Each model takes exactly one input:
  - `image`: BYTES [N], encoded images (PNG, JPEG, ...): raw bytes in the binary tensor data
    extension, base64 strings in JSON;
  - `input`: FP32 [N, 3, S, S], images already preprocessed as the task declares (S its image size).
It answers `probabilities`: FP32 [N, classes]; asked with `parameters: {"classification": k}`, that
output is instead BYTES [N, k] of "score:index:label", best first (the classification extension).
"""

from __future__ import annotations

import base64
import binascii
import logging
import re

import numpy as np
import torch
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.deadlines import Deadline
from service.deps import DataPlaneDep, DeadlineDep, RegistryDep
from service.engine import LoadedTask
from service.errors import (
    BadRequest,
    UnsupportedEncoding,
    error_kind,
    error_response,
    status_for,
    validation_message,
)
from service.inference import Answer, DataPlane, EncodedImages, Inputs, PreprocessedImages, serving_task
from service.middleware.answers import RefusedMidBody
from service.protocols import Protocol
from service.registry import TaskRegistry
from service.v2_wire import (
    HEADER_LENGTH,
    InferRequest,
    InputTensor,
    OutputTensor,
    encode_infer_response,
    parse_infer_request,
)

log = logging.getLogger("piggyback.v2")

IMAGE_INPUT = "image"
TENSOR_INPUT = "input"
OUTPUT = "probabilities"
EXTENSIONS = ["binary_tensor_data", "classification"]
JSON_VALUES_BESIDE_DATA = 1024  # names, shapes, parameters: a request's JSON values other than its tensor data


def protocol_error(request: Request, exc: Exception) -> JSONResponse:
    """Any exception in this protocol's words: client errors keep their status (a malformed request is
    400, not 422), the rest are 500 with the details in the log, not in the answer."""
    if isinstance(exc, RequestValidationError):
        status, message = 400, validation_message(exc)
    elif isinstance(exc, StarletteHTTPException):
        status, message = exc.status_code, str(exc.detail)
    else:
        status, message = status_for(exc), str(exc)
    if status == 500:
        log.error("V2 %s %s failed", request.method, request.url.path, exc_info=exc)
        message = f"internal error ({type(exc).__name__}); see the server log"
    return error_response(request, status, message, error_kind(exc), getattr(exc, "headers", None))


class V2Route(APIRoute):
    """Routes whose errors, from dependencies or handlers alike, take the protocol's error shape."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RefusedMidBody:
                raise  # the middleware that refused the body answers it, in this protocol's shape too
            except Exception as exc:
                return protocol_error(request, exc)

        return handle


PROTOCOL = Protocol(  # KServe V2
    name="v2",
    prefix="/v2",
    error_key="error",
    prediction=re.compile(r"^/v2/models/(?P<task>[^/]+)(?:/versions/[^/]+)?/infer$"),
    task_route=re.compile(r"^/v2/models/(?P<task>[^/]+)/"),
)
router = APIRouter(
    prefix="/v2",
    tags=["Open Inference Protocol (KServe V2)"],
    route_class=V2Route,
    responses=PROTOCOL.errors(400),
)


async def _model(registry: TaskRegistry, name: str, version: str | None) -> LoadedTask:
    return await serving_task(registry, name, version)


@router.get("")
def server_metadata(request: Request) -> dict:
    return {"name": "piggyback-serve", "version": request.app.version, "extensions": EXTENSIONS}


@router.get("/health/live")
def live() -> dict:
    return {"live": True}


@router.get("/health/ready", responses=PROTOCOL.errors(503))
def ready(registry: RegistryDep) -> dict:
    return {"ready": True}


def _metadata(task: LoadedTask) -> dict:
    size, classes = task.manifest.preprocess.size, len(task.manifest.labels)
    return {
        "name": task.manifest.task,
        "versions": [str(task.manifest.version)],
        "platform": "piggyback",
        "inputs": [
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, 3, size, size]},
        ],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, classes]}],
    }


@router.get("/models/{name}", responses=PROTOCOL.errors(404, 503))
async def model_metadata(name: str, registry: RegistryDep) -> dict:
    return _metadata(await _model(registry, name, None))


@router.get("/models/{name}/versions/{version}", responses=PROTOCOL.errors(404, 503))
async def model_version_metadata(name: str, version: str, registry: RegistryDep) -> dict:
    return _metadata(await _model(registry, name, version))


@router.get("/models/{name}/ready", responses=PROTOCOL.errors(404, 503))
async def model_ready(name: str, registry: RegistryDep) -> dict:
    return {"name": (await _model(registry, name, None)).manifest.task, "ready": True}


@router.get("/models/{name}/versions/{version}/ready", responses=PROTOCOL.errors(404, 503))
async def model_version_ready(name: str, version: str, registry: RegistryDep) -> dict:
    return {"name": (await _model(registry, name, version)).manifest.task, "ready": True}


def _image_blobs(tensor: InputTensor, plane: DataPlane) -> EncodedImages:
    if tensor.datatype != "BYTES":
        raise BadRequest(f"input {IMAGE_INPUT!r} must be BYTES (encoded images), not {tensor.datatype}")
    if len(tensor.shape) != 1 or tensor.shape[0] < 1:
        raise BadRequest(f"input {IMAGE_INPUT!r} must have shape [N] with N >= 1, not {tensor.shape}")
    plane.check_count(tensor.shape[0])
    elements = tensor.as_bytes_elements()
    if len(elements) != tensor.shape[0]:
        raise BadRequest(f"input {IMAGE_INPUT!r}: {len(elements)} elements for shape {tensor.shape}")
    blobs = []
    for index, element in enumerate(elements):
        name = f"{IMAGE_INPUT}[{index}]"
        if tensor.raw is None:  # JSON carries bytes as base64 text
            try:
                element = base64.b64decode(element, validate=True)
            except binascii.Error as exc:
                raise BadRequest(f"{name}: BYTES in JSON must be base64-encoded images ({exc})") from exc
        plane.check_size(name, len(element))
        blobs.append((name, element))
    return EncodedImages(blobs)


def _tensor_batch(tensor: InputTensor, size: int, plane: DataPlane) -> PreprocessedImages:
    if tensor.datatype != "FP32":
        raise BadRequest(f"input {TENSOR_INPUT!r} must be FP32 (preprocessed images), not {tensor.datatype}")
    if len(tensor.shape) != 4 or tensor.shape[0] < 1 or tensor.shape[1:] != [3, size, size]:
        raise BadRequest(f"input {TENSOR_INPUT!r} must have shape [N, 3, {size}, {size}], N >= 1; not {tensor.shape}")
    plane.check_count(tensor.shape[0])
    array = tensor.as_numpy()
    if not np.isfinite(array).all():
        raise BadRequest(f"input {TENSOR_INPUT!r} holds NaN or infinite values")
    return PreprocessedImages(torch.from_numpy(array.copy()))


def _outputs(parsed: InferRequest, answer: Answer) -> list[OutputTensor]:
    """The requested outputs (all of them by default): probabilities, or with the classification
    extension (`parameters.classification` on an output, or on the request for every output) the top k."""
    requested = parsed.outputs if parsed.outputs is not None else [None]
    outputs = []
    for wanted in requested:
        binary = parsed.default_binary if wanted is None else wanted.binary
        if wanted is not None and wanted.name != OUTPUT:
            raise BadRequest(f"unknown output {wanted.name!r}; this model answers {OUTPUT!r}")
        k = wanted.classification if wanted is not None and wanted.classification is not None else parsed.classification
        if k is None:
            probabilities = answer.probabilities
            outputs.append(OutputTensor(OUTPUT, "FP32", list(probabilities.shape), probabilities.numpy(), binary))
            continue
        ranked = answer.top_k(k)
        values = [f"{s.score}:{s.index}:{s.label}".encode() for row in ranked for s in row]
        outputs.append(OutputTensor(OUTPUT, "BYTES", [len(ranked), len(ranked[0])], values, binary))
    return outputs


async def _infer(name: str, version: str | None, request: Request, plane: DataPlane, deadline: Deadline) -> Response:
    parsed: InferRequest | None = None

    async def read(task: LoadedTask) -> Inputs:
        nonlocal parsed
        encoding = request.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise UnsupportedEncoding(f"Content-Encoding {encoding!r} is not supported; send the request uncompressed")
        size = task.manifest.preprocess.size
        max_values = plane.settings.max_images_per_request * 3 * size * size + JSON_VALUES_BESIDE_DATA
        # Parsing and encoding a body of many MB take seconds of CPU: in a thread, so the event loop
        # (health checks, other clients) never waits on them.
        body = await request.body()
        parsed = await run_in_threadpool(parse_infer_request, body, request.headers.get(HEADER_LENGTH), max_values)
        if len(parsed.inputs) != 1:
            raise BadRequest(f"send exactly one input, {IMAGE_INPUT!r} or {TENSOR_INPUT!r}; got {len(parsed.inputs)}")
        tensor = parsed.inputs[0]
        if tensor.name == IMAGE_INPUT:
            return await run_in_threadpool(_image_blobs, tensor, plane)
        if tensor.name == TENSOR_INPUT:
            return await run_in_threadpool(_tensor_batch, tensor, size, plane)
        raise BadRequest(f"unknown input {tensor.name!r}; send {IMAGE_INPUT!r} (BYTES) or {TENSOR_INPUT!r} (FP32)")

    answer = await plane.predict(name, version, read, deadline)
    outputs = _outputs(parsed, answer)
    response = {"model_name": answer.task.name, "model_version": str(answer.task.version)}
    if parsed.id is not None:
        response["id"] = parsed.id
    body, headers = await run_in_threadpool(encode_infer_response, response, outputs)
    return Response(body, headers=headers)


INFER_ERRORS = PROTOCOL.errors(404, 408, 413, 415, 503, 504)


# The body is read raw (JSON, or JSON + binary tensors); this documents it in /docs.
INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object", "description": "an inference request: 'inputs', optional 'outputs'"},
                "example": {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["<base64>"]}]},
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "JSON request then binary tensors; header Inference-Header-Content-Length",
            },
        },
    }
}


@router.post("/models/{name}/infer", openapi_extra=INFER_BODY, responses=INFER_ERRORS)
async def infer(name: str, request: Request, plane: DataPlaneDep, deadline: DeadlineDep) -> Response:
    return await _infer(name, None, request, plane, deadline)


@router.post("/models/{name}/versions/{version}/infer", openapi_extra=INFER_BODY, responses=INFER_ERRORS)
async def infer_version(
    name: str, version: str, request: Request, plane: DataPlaneDep, deadline: DeadlineDep
) -> Response:
    return await _infer(name, version, request, plane, deadline)
