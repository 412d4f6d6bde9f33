"""Task artifacts for Piggyback masks and their durable, validated file-system store.

Knows nothing of HTTP or training: it defines which backbone layers are masked (and in what
order), how masks are packed, how artifacts are written and checked, and how the store stays
consistent across crashes.
"""

from mask_store.artifact import (
    TaskArtifact,
    artifact_bytes,
    artifact_identity,
    load_artifact,
    make_artifact,
    parse_artifact,
    save_artifact,
)
from mask_store.backbone import (
    BackboneLayout,
    build_backbone,
    head_module_name,
    maskable_layers,
    replace_head,
)
from mask_store.errors import (
    BackboneMismatch,
    CorruptArtifact,
    CorruptWeights,
    MaskStoreError,
    TaskNotFound,
    UnsupportedArchitecture,
    UnsupportedImage,
)
from mask_store.image_modes import normalize_image
from mask_store.manifest import LayerEntry, Manifest, MaskSpec, Preprocess
from mask_store.objects import ObjectStore, StoreFull, StoreUnavailable
from mask_store.preprocess import build_transform
from mask_store.store import LiveTask, Snapshot, TaskStore, TaskVersionExists
from mask_store.weights import offline_weights, verify_weights_file

__all__ = [
    "BackboneLayout",
    "BackboneMismatch",
    "CorruptArtifact",
    "CorruptWeights",
    "LayerEntry",
    "Manifest",
    "MaskSpec",
    "MaskStoreError",
    "Preprocess",
    "LiveTask",
    "Snapshot",
    "ObjectStore",
    "StoreFull",
    "StoreUnavailable",
    "TaskArtifact",
    "TaskNotFound",
    "TaskStore",
    "TaskVersionExists",
    "UnsupportedArchitecture",
    "UnsupportedImage",
    "artifact_bytes",
    "artifact_identity",
    "build_backbone",
    "build_transform",
    "head_module_name",
    "load_artifact",
    "make_artifact",
    "maskable_layers",
    "normalize_image",
    "parse_artifact",
    "offline_weights",
    "replace_head",
    "save_artifact",
    "verify_weights_file",
]
