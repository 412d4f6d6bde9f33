"""Admin routes: hot-register and unregister tasks. Bearer token required."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Response, UploadFile, status
from starlette.concurrency import run_in_threadpool

from service.deps import AdminDep, RegistryDep, SettingsDep
from service.errors import BadRequest, PayloadTooLarge
from service.routes.tasks import PROTOCOL as TASKS  # admin errors are worded as the /tasks ones
from service.schemas import TaskInfo

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep], responses=TASKS.errors(401, 403, 503))


@router.post(
    "/tasks",
    status_code=status.HTTP_201_CREATED,
    response_model=TaskInfo,
    responses=TASKS.errors(400, 409, 413, 422, 507),
)
async def register_task(
    artifact: Annotated[UploadFile, File(description="a task artifact written by `python -m training train`")],
    registry: RegistryDep,
    settings: SettingsDep,
) -> TaskInfo:
    data = await artifact.read(settings.max_artifact_bytes + 1)
    if len(data) > settings.max_artifact_bytes:
        raise PayloadTooLarge(f"artifact larger than {settings.max_artifact_bytes} bytes")
    if not data:
        raise BadRequest("empty artifact upload; send the file in the 'artifact' field")
    # validation, hashing and fsync are slow: off the event loop. In-flight requests keep the
    # LoadedTask they resolved, so swapping the registry entry never disturbs a running batch.
    task = await run_in_threadpool(registry.register, data)
    return TaskInfo.from_manifest(task.manifest)


@router.delete("/tasks/{name}", status_code=status.HTTP_204_NO_CONTENT, responses=TASKS.errors(404))
async def unregister_task(name: str, registry: RegistryDep) -> Response:
    await run_in_threadpool(registry.unregister, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/store/rebuild-index", responses=TASKS.errors(409))
async def rebuild_store_index(registry: RegistryDep) -> dict:
    """After the store's index was lost (deleted, or an emptied prefix restored without it): a new index
    naming every task object in the store, each read and validated. 409 while an index exists."""
    index = await run_in_threadpool(registry.rebuild_index)
    return {"tasks": len(index.tasks), "generation": index.generation}
