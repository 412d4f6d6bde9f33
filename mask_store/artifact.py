"""One task as one file: a safetensors container whose metadata holds the JSON manifest.

Tensors: `mask.nonzero` (and `mask.negative` for ternary) hold the bit planes in the manifest's
encoding, as uint8; `task.<name>` holds each backbone parameter/buffer the task overrides (head,
per-task BatchNorm, fine-tuned layers). Keys never contain the task's name, so an artifact can be
renamed by editing only its manifest. No pickle: a user's file is parsed by safetensors and pydantic.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from mask_store import packing
from mask_store.backbone import BackboneLayout
from mask_store.errors import BackboneMismatch, CorruptArtifact
from mask_store.fsio import atomic_write_bytes
from mask_store.manifest import BackboneRef, LayerEntry, Manifest, MaskSpec, Preprocess

MANIFEST_KEY = "piggyback.manifest"
PLANE_KEYS = ("mask.nonzero", "mask.negative")
TASK_PREFIX = "task."


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


@dataclass(frozen=True)
class TaskArtifact:
    """A validated task: its manifest, the raw packed bit planes, and its own tensors."""

    manifest: Manifest
    planes: tuple[bytes, ...]  # decoded (uncompressed) packed planes: nonzero[, negative]
    stored: tuple[bytes, ...]  # the same planes as written to disk, in the manifest's encoding
    task_tensors: dict[str, torch.Tensor]

    @property
    def name(self) -> str:
        return self.manifest.task

    def plane_tensors(self) -> tuple[torch.Tensor, ...]:
        """The packed planes as uint8 tensors, the form the mask-apply kernels read."""
        return tuple(_bytes_tensor(plane) for plane in self.planes)

    def masks(self) -> dict[str, torch.Tensor]:
        """Unpacked masks by layer name, as float32 in {0, 1} or {-1, 0, 1}. For references and tests."""
        count = self.manifest.mask.numel
        values = packing.unpack_bits(self.planes[0], count).astype(np.float32)
        if self.manifest.mask.kind == "ternary":
            values[packing.unpack_bits(self.planes[1], count)] *= -1.0
        return {
            layer.name: torch.from_numpy(values[layer.bit_offset : layer.bit_offset + layer.numel].copy()).reshape(
                layer.shape
            )
            for layer in self.manifest.layers
        }

    def check_backbone(self, layout: BackboneLayout) -> None:
        """Refuse (BackboneMismatch) unless this task was learned over exactly this backbone."""
        ref = self.manifest.backbone
        if ref.arch != layout.arch:
            raise BackboneMismatch(f"task {self.name} is for a {ref.arch} backbone; this server runs {layout.arch}")
        ours = [(layer.name, tuple(layer.shape)) for layer in self.manifest.layers]
        theirs = list(zip(layout.names, layout.shapes, strict=True))
        if ours != theirs:
            raise BackboneMismatch(f"task {self.name}: masked layer names or shapes differ from the backbone's")
        head_weight = f"{layout.head}.weight"
        if head_weight not in self.task_tensors and layout.state_shapes[head_weight][0] != len(self.manifest.labels):
            raise BackboneMismatch(
                f"task {self.name} has {len(self.manifest.labels)} labels but no head of its own, and the backbone's "
                f"head has {layout.state_shapes[head_weight][0]} outputs"
            )
        for name, tensor in self.task_tensors.items():
            if name not in layout.state_shapes:
                raise BackboneMismatch(f"task {self.name} overrides {name}, which this backbone does not have")
            expected = layout.state_shapes[name]
            if name == f"{layout.head}.weight":
                expected = (len(self.manifest.labels), expected[1])
            elif name == f"{layout.head}.bias":
                expected = (len(self.manifest.labels),)
            if tuple(tensor.shape) != expected:
                raise BackboneMismatch(f"task {self.name}: {name} has shape {tuple(tensor.shape)}, expected {expected}")
        if ref.fingerprint != layout.fingerprint:
            raise BackboneMismatch(
                f"task {self.name} was trained on backbone weights {ref.fingerprint[:12]}…, "
                f"this server's are {layout.fingerprint[:12]}…; retrain it on this backbone"
            )


def make_artifact(
    *,
    layout: BackboneLayout,
    masks: dict[str, torch.Tensor],
    kind: str,
    threshold: float,
    task: str,
    version: int,
    labels: list[str],
    task_tensors: dict[str, torch.Tensor],
    preprocess: Preprocess,
    training: dict | None = None,
) -> TaskArtifact:
    """Pack learned masks (by layer name, values in {0,1} or {-1,0,1}) into a validated artifact."""
    missing = set(layout.names) - set(masks)
    if missing:
        raise ValueError(f"masks missing for layers: {sorted(missing)[:5]}")
    flat = [masks[name].detach().reshape(-1).cpu() for name in layout.names]
    planes = [packing.pack_bits(torch.cat([values != 0 for values in flat]).numpy())]
    if kind == "ternary":
        planes.append(packing.pack_bits(torch.cat([values < 0 for values in flat]).numpy()))
    layers = [
        LayerEntry(
            name=name,
            shape=shape,
            bit_offset=offset,
            numel=numel,
            density=torch.count_nonzero(masks[name]).item() / max(masks[name].numel(), 1),
        )
        for name, shape, offset, numel in zip(layout.names, layout.shapes, layout.offsets, layout.numels, strict=True)
    ]
    encoding, first = packing.smallest_encoding(planes[0], layout.total)
    stored = [first, *(packing.encode(plane, layout.total, encoding) for plane in planes[1:])]
    tensors = {key: _bytes_tensor(blob) for key, blob in zip(PLANE_KEYS, stored, strict=False)}
    tensors.update({TASK_PREFIX + name: t.detach().cpu().contiguous() for name, t in task_tensors.items()})
    manifest = Manifest(
        task=task,
        version=version,
        labels=tuple(labels),
        backbone=BackboneRef(arch=layout.arch, fingerprint=layout.fingerprint),
        mask=MaskSpec(
            kind=kind,
            threshold=threshold,
            encoding=encoding,
            numel=layout.total,
            packed_bytes=sum(len(p) for p in planes),
            stored_bytes=sum(len(s) for s in stored),
        ),
        layers=tuple(layers),
        task_tensors=tuple(sorted(task_tensors)),
        preprocess=preprocess,
        training=training or {},
        checksums={key: _sha256(t) for key, t in tensors.items()},
    )
    return TaskArtifact(manifest=manifest, planes=tuple(planes), stored=tuple(stored), task_tensors=dict(task_tensors))


def artifact_bytes(artifact: TaskArtifact) -> bytes:
    """Serialize: stored planes + task tensors, manifest in the safetensors metadata."""
    tensors = {key: _bytes_tensor(blob) for key, blob in zip(PLANE_KEYS, artifact.stored, strict=False)}
    tensors.update({TASK_PREFIX + name: t.contiguous() for name, t in artifact.task_tensors.items()})
    return safetensors_save(tensors, metadata={MANIFEST_KEY: artifact.manifest.model_dump_json()})


def save_artifact(artifact: TaskArtifact, path: str | Path) -> Path:
    """Write the artifact atomically to `path` (a single file)."""
    path = Path(path)
    atomic_write_bytes(path, artifact_bytes(artifact))
    return path


def _safetensors_metadata(data: bytes) -> dict[str, str] | None:
    """The `__metadata__` of a safetensors buffer: an 8-byte little-endian header length, then JSON."""
    if len(data) < 8:
        raise CorruptArtifact("artifact is shorter than a safetensors header")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise CorruptArtifact("artifact is truncated: its header is longer than the file")
    header = json.loads(data[8 : 8 + length])
    return header.get("__metadata__") if isinstance(header, dict) else None


def _parse_manifest(metadata: dict[str, str] | None) -> Manifest:
    if not metadata or MANIFEST_KEY not in metadata:
        raise CorruptArtifact("artifact has no Piggyback manifest in its metadata")
    try:
        return Manifest.model_validate(json.loads(metadata[MANIFEST_KEY]))
    except (ValidationError, json.JSONDecodeError) as exc:
        raise CorruptArtifact(f"artifact manifest is invalid: {exc}") from exc


def load_artifact(path: str | Path, display_name: str | None = None) -> TaskArtifact:
    """Read and fully validate an artifact file (see `parse_artifact`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CorruptArtifact(f"{display_name or Path(path).name}: cannot be read ({exc})") from exc
    return parse_artifact(data, display_name or Path(path).name)


def artifact_identity(manifest: Manifest) -> str:
    """sha256 of the manifest, which holds a sha256 of every tensor: names one artifact's content."""
    return hashlib.sha256(manifest.model_dump_json().encode()).hexdigest()


def parse_artifact(data: bytes, name: str = "artifact") -> TaskArtifact:
    """Validate an artifact held in memory: manifest schema, key set, every checksum, plane sizes.

    Raises CorruptArtifact for anything truncated, garbage, tampered or self-contradictory.
    """
    try:
        metadata = _safetensors_metadata(data)
        manifest = _parse_manifest(metadata)
        tensors = safetensors_load(data)
    except CorruptArtifact:
        raise
    except Exception as exc:  # safetensors raises several types for a torn or garbage file
        raise CorruptArtifact(f"{name}: not a readable task artifact ({exc})") from exc

    spec = manifest.mask
    expected = set(PLANE_KEYS[: spec.planes]) | {TASK_PREFIX + n for n in manifest.task_tensors}
    if set(tensors) != expected or set(manifest.checksums) != expected:
        raise CorruptArtifact(f"{name}: tensors {sorted(tensors)} do not match the manifest's {sorted(expected)}")
    for key, tensor in tensors.items():
        if _sha256(tensor) != manifest.checksums[key]:
            raise CorruptArtifact(f"{name}: checksum mismatch in {key}; the file was altered or damaged")
    planes, stored = [], []
    for key in PLANE_KEYS[: spec.planes]:
        stored.append(tensors[key].numpy().tobytes())
        try:
            planes.append(packing.decode(stored[-1], spec.numel, spec.encoding))
        except Exception as exc:
            raise CorruptArtifact(f"{name}: mask plane {key} does not decode: {exc}") from exc
    task_tensors = {key[len(TASK_PREFIX) :]: t for key, t in tensors.items() if key.startswith(TASK_PREFIX)}
    for key, tensor in task_tensors.items():
        if key.endswith(".num_batches_tracked"):
            continue  # BatchNorm's step counter is an integer buffer
        if not tensor.is_floating_point():
            raise CorruptArtifact(f"{name}: task tensor {key} is {tensor.dtype}; weights and statistics must be float")
        if not torch.isfinite(tensor).all():
            raise CorruptArtifact(f"{name}: task tensor {key} holds NaN or infinite values")
    return TaskArtifact(manifest=manifest, planes=tuple(planes), stored=tuple(stored), task_tensors=task_tensors)
