"""The JSON manifest carried inside every task artifact, validated with pydantic on every read."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FORMAT_VERSION = 1
MAX_VERSION = 10**12 - 1  # versions name files `<version:08d>.safetensors`: keep names short and sortable
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
PositiveFiniteFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
TASK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LayerEntry(_Strict):
    """One masked layer: where its bits sit in the flat mask, and how many of them are kept."""

    name: str
    shape: tuple[int, ...]
    bit_offset: int = Field(ge=0)
    numel: int = Field(gt=0)
    density: float = Field(ge=0.0, le=1.0, description="fraction of weights kept (mask != 0)")


class MaskSpec(_Strict):
    """How the masks were thresholded and how their bits are stored."""

    kind: Literal["binary", "ternary"]
    threshold: float
    encoding: Literal["raw", "zlib", "sparse"]
    numel: int = Field(gt=0, description="masked parameters, i.e. bits per plane")
    packed_bytes: int = Field(ge=0, description="bytes of the uncompressed bit planes, all planes")
    stored_bytes: int = Field(ge=0, description="bytes actually stored, all planes")

    @property
    def planes(self) -> int:
        return 2 if self.kind == "ternary" else 1

    @property
    def bits_per_param(self) -> float:
        """Stored mask bits per masked parameter (the paper's storage claim: <= 1 for binary)."""
        return 8.0 * self.stored_bytes / self.numel


class Preprocess(_Strict):
    """How the service turns an uploaded image into the tensor this task was trained on."""

    size: int = Field(gt=0, le=1024)
    # ImageNet style when set: shorter side resized to `resize`, then a centred `size` x `size` crop.
    # Unset (older artifacts): the whole image is resized to `size` x `size`.
    resize: int | None = Field(None, gt=0, le=2048)
    grayscale: bool = False
    mean: tuple[FiniteFloat, FiniteFloat, FiniteFloat] = (0.485, 0.456, 0.406)
    std: tuple[PositiveFiniteFloat, PositiveFiniteFloat, PositiveFiniteFloat] = (0.229, 0.224, 0.225)


class BackboneRef(_Strict):
    arch: str
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(_Strict):
    """Everything about a task except its tensors; checksums bind it to those tensors."""

    format_version: Literal[1] = FORMAT_VERSION
    task: str = Field(pattern=TASK_NAME_PATTERN)
    version: int = Field(ge=1, le=MAX_VERSION)
    labels: tuple[str, ...] = Field(min_length=1)
    backbone: BackboneRef
    mask: MaskSpec
    layers: tuple[LayerEntry, ...] = Field(min_length=1)
    task_tensors: tuple[str, ...] = Field(
        description="backbone parameter/buffer names this task overrides: head, per-task BN, fine-tuned layers"
    )
    preprocess: Preprocess
    training: dict = Field(default_factory=dict, description="free-form provenance: recipe, accuracy")
    checksums: dict[str, str] = Field(description="sha256 of every tensor blob, by safetensors key")

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(labels)) != len(labels):
            raise ValueError("class labels must be unique")
        return labels

    @model_validator(mode="after")
    def _layers_tile_the_mask(self) -> Manifest:
        expected = 0
        for layer in self.layers:
            if layer.bit_offset != expected:
                raise ValueError(f"layer {layer.name} starts at bit {layer.bit_offset}, expected {expected}")
            product = 1
            for dim in layer.shape:
                product *= dim
            if product != layer.numel:
                raise ValueError(f"layer {layer.name}: shape {layer.shape} has {product} weights, not {layer.numel}")
            expected += layer.numel
        if expected != self.mask.numel:
            raise ValueError(f"layers cover {expected} weights but the mask has {self.mask.numel}")
        return self

    @property
    def bits_per_param(self) -> float:
        return self.mask.bits_per_param

    @property
    def density(self) -> float:
        kept = sum(layer.density * layer.numel for layer in self.layers)
        return kept / self.mask.numel
