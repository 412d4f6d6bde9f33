"""Response schemas of the HTTP API (requests are multipart uploads)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from mask_store.artifact import artifact_identity
from mask_store.manifest import Manifest, Preprocess


class ScoredLabel(BaseModel):
    label: str
    index: int
    score: float


class Prediction(ScoredLabel):
    top_k: list[ScoredLabel]


class PredictResponse(BaseModel):
    task: str
    version: int
    predictions: list[Prediction]


class BackboneInfo(BaseModel):
    arch: str
    fingerprint: str


class TaskInfo(BaseModel):
    name: str
    status: Literal["serving"] = "serving"
    version: int
    identity: str = Field(
        description="sha256 of the artifact's manifest, which binds every tensor: same identity, same task"
    )
    resident: bool = Field(True, description="its masks, BN and head are on this replica's device")
    weights_cached: bool = Field(False, description="its masked weights are materialized in this replica's cache")
    labels: list[str]
    num_classes: int
    backbone: BackboneInfo
    mask_kind: str
    masked_parameters: int
    bits_per_parameter: float
    mask_density: float
    mask_stored_bytes: int
    task_tensor_count: int
    preprocess: Preprocess
    training: dict

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> TaskInfo:
        return cls(
            name=manifest.task,
            version=manifest.version,
            identity=artifact_identity(manifest),
            labels=list(manifest.labels),
            num_classes=len(manifest.labels),
            backbone=BackboneInfo(arch=manifest.backbone.arch, fingerprint=manifest.backbone.fingerprint),
            mask_kind=manifest.mask.kind,
            masked_parameters=manifest.mask.numel,
            bits_per_parameter=manifest.bits_per_param,
            mask_density=manifest.density,
            mask_stored_bytes=manifest.mask.stored_bytes,
            task_tensor_count=len(manifest.task_tensors),
            preprocess=manifest.preprocess,
            training=manifest.training,
        )


class RegisteredTask(BaseModel):
    """A stored task not loaded on this replica yet: it loads on its first request (`GET /tasks/{name}`
    describes it in full)."""

    name: str
    status: Literal["registered"] = "registered"
    version: int
    identity: str
    resident: bool = False


class FailedTask(BaseModel):
    """A stored task this replica does not serve: its artifact failed to load or to run."""

    name: str
    status: Literal["failed"] = "failed"
    error: str


class Unready(BaseModel):
    """`/readyz` while the replica cannot serve: why, in `detail`."""

    status: Literal["not ready", "draining"]
    detail: str
