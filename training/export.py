"""Turn a trained Piggyback model into a task artifact: only the bits, the head, BN and fine-tuned layers."""

from __future__ import annotations

from torch import nn

from mask_store import BackboneLayout, Preprocess, TaskArtifact, head_module_name, make_artifact
from training.masking import learned_masks
from training.trainer import BN_TYPES, TrainResult


def task_tensors(model: nn.Module, result: TrainResult) -> dict:
    """The tensors that differ from the backbone, keyed by the backbone's own parameter names."""
    state = model.state_dict()
    head = head_module_name(model)
    keep = {f"{head}.weight", f"{head}.bias"}
    if result.config.bn_is_trained:
        for name, module in model.named_modules():
            if isinstance(module, BN_TYPES):
                keep |= {f"{name}.{suffix}" for suffix in ("weight", "bias", "running_mean", "running_var")}
    for name in result.config.finetune_layers:
        keep |= {f"{name}.weight", f"{name}.bias"}
    return {key: state[key].detach().cpu().clone() for key in sorted(keep) if key in state}


def export_artifact(
    result: TrainResult,
    layout: BackboneLayout,
    *,
    task: str,
    version: int,
    labels: list[str],
    preprocess: Preprocess,
    extra: dict | None = None,
) -> TaskArtifact:
    """Package a piggyback/mixed result; fine-tuned layers get an all-ones mask plus their own weights.

    The manifest records no wall-clock time, so identical training writes identical bytes.
    """
    if result.config.method not in ("piggyback", "mixed"):
        raise ValueError(f"only piggyback and mixed results become task artifacts, not {result.config.method!r}")
    model = result.model
    masks = learned_masks(model)
    for name in result.config.finetune_layers:
        masks[name] = model.get_submodule(name).weight.new_ones(model.get_submodule(name).weight.shape).cpu()
    config = result.config
    training = {
        "method": config.method,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "lr_scores": config.lr_scores,
        "lr_head": config.lr_head,
        "per_task_bn": config.per_task_bn,
        "finetune_layers": list(config.finetune_layers),
        "val_accuracy": result.val_accuracy,
        **(extra or {}),
    }
    return make_artifact(
        layout=layout,
        masks=masks,
        kind=config.mask.kind,
        threshold=config.mask.threshold,
        task=task,
        version=version,
        labels=labels,
        task_tensors=task_tensors(model, result),
        preprocess=preprocess,
        training=training,
    )
