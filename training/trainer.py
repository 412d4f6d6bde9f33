"""Training recipes: Piggyback masks, mixed (some layers fine-tuned), and the two baselines.

Every method trains a *copy* of the backbone: the backbone passed in is never modified.
The loop follows the paper: Adam for scores and head in separate groups, step decay x0.1,
batch 32. Baselines share the same data pipeline: classifier-only (Adam on the head) and full
fine-tuning (SGD momentum 0.9, lr 1e-3).
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mask_store import head_module_name, maskable_layers, replace_head
from mask_store.errors import MaskStoreError
from training.masking import MaskConfig, MaskedLayer, apply_masking

Method = Literal["piggyback", "mixed", "classifier", "finetune"]
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class TrainConfig:
    method: Method = "piggyback"
    epochs: int = 30  # paper: 30 epochs ...
    lr_decay_every: int = 15  # ... with lr x0.1 after 15
    batch_size: int = 32  # paper
    lr_scores: float = 1e-4  # paper, Adam
    lr_head: float = 1e-3  # measured here: the fresh head learns far too slowly at 1e-4
    lr_finetune: float = 1e-3  # paper's fine-tuning baseline, SGD momentum 0.9
    per_task_bn: bool = False  # paper's two settings: frozen backbone BN, or BN learned per task
    reestimate_bn: bool = True  # re-estimate BN running stats with the final mask (masks flip while training)
    finetune_layers: tuple[str, ...] = ()  # "mixed": these layers are fine-tuned, all others masked
    mask: MaskConfig = field(default_factory=MaskConfig)
    seed: int = 0
    device: str = "cpu"
    num_workers: int = 0
    progress: bool = True  # a live progress bar, drawn only on a terminal; one summary line per epoch always

    @property
    def bn_is_trained(self) -> bool:
        return self.method == "finetune" or (self.method in ("piggyback", "mixed") and self.per_task_bn)


@dataclass
class TrainResult:
    model: nn.Module
    val_accuracy: float | None  # None when the validation data could not be read: the model is still returned
    history: list[dict]
    seconds: float
    config: TrainConfig


def prepare_model(backbone: nn.Module, num_classes: int, config: TrainConfig) -> nn.Module:
    """A trainable copy of the backbone for `config.method`; the backbone itself is left untouched.

    Fine-tuned layers must be masked leaves: a block would unfreeze the weights of the masked layers inside it.
    """
    maskable = {name for name, _ in maskable_layers(backbone)}
    for name in config.finetune_layers:
        if name not in maskable:
            raise ValueError(f"fine-tuned layer {name!r} is not a masked Conv2d/Linear leaf of the backbone")
    model = copy.deepcopy(backbone)
    for param in model.parameters():
        param.requires_grad_(False)
    head = replace_head(model, num_classes)
    if config.method in ("piggyback", "mixed"):
        apply_masking(model, config.mask, skip=frozenset(config.finetune_layers))
        for name in config.finetune_layers:
            model.get_submodule(name).requires_grad_(True)
    if config.method == "finetune":
        model.requires_grad_(True)
    if config.bn_is_trained:
        for module in model.modules():
            if isinstance(module, BN_TYPES):
                module.requires_grad_(True)
    head.requires_grad_(True)
    return model


def set_train_mode(model: nn.Module, config: TrainConfig) -> None:
    """Train mode, except BatchNorm stays in eval (frozen statistics) unless it is learned per task."""
    model.train()
    if not config.bn_is_trained:
        for module in model.modules():
            if isinstance(module, BN_TYPES):
                module.eval()


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.method == "finetune":
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.lr_finetune, momentum=0.9)
    head = model.get_submodule(head_module_name(model))
    head_ids = {id(p) for p in head.parameters()}
    scores = [m.scores for m in model.modules() if isinstance(m, MaskedLayer)]
    score_ids = {id(p) for p in scores}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids | score_ids]
    groups = [{"params": list(head.parameters()), "lr": config.lr_head}]
    if scores:
        groups.append({"params": scores, "lr": config.lr_scores})
    if others:  # per-task BN affine and fine-tuned layers of "mixed"
        groups.append({"params": others, "lr": config.lr_scores if config.method == "mixed" else config.lr_head})
    return torch.optim.Adam(groups)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256, device: str = "cpu") -> float:
    """Top-1 accuracy in eval mode."""
    model.eval()
    correct = total = 0
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        predictions = model(images.to(device)).argmax(dim=1).cpu()
        correct += int((predictions == labels).sum())
        total += len(labels)
    return correct / max(total, 1)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, dataset: Dataset, config: TrainConfig) -> None:
    """One pass over the training data with the final masks, recomputing BN running statistics exactly."""
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES)]
    saved = [m.momentum for m in bns]
    for module in bns:
        module.reset_running_stats()
        module.momentum = None  # cumulative average over the whole pass
    model.train()
    batch_size = config.batch_size * 4
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=config.num_workers, drop_last=len(dataset) > batch_size
    )
    for images, _ in loader:
        model(images.to(config.device))
    for module, momentum in zip(bns, saved, strict=True):
        module.momentum = momentum
    model.eval()


def train_task(
    backbone: nn.Module, train_set: Dataset, val_set: Dataset, num_classes: int, config: TrainConfig
) -> TrainResult:
    """Train one task with `config.method` and report validation accuracy (read top to bottom)."""
    torch.manual_seed(config.seed)
    model = prepare_model(backbone, num_classes, config).to(config.device)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_decay_every, gamma=0.1)
    loader = DataLoader(  # drop_last: a final batch of one image breaks BatchNorm in train mode
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed),
        drop_last=len(train_set) > config.batch_size,
    )
    loss_fn = nn.CrossEntropyLoss()
    history, started = [], time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        set_train_mode(model, config)
        seen = correct = 0
        loss_sum = 0.0
        epoch_start = time.perf_counter()
        bar = tqdm(
            loader,
            desc=f"{config.method} epoch {epoch}/{config.epochs}",
            disable=not (config.progress and sys.stderr.isatty()),
            leave=False,
        )
        for images, labels in bar:
            images, labels = images.to(config.device), labels.to(config.device)
            logits = model(images)
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            loss_sum += loss.item() * len(labels)
            rate = seen / (time.perf_counter() - epoch_start)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", samples_s=f"{rate:.0f}")
        scheduler.step()
        history.append({"epoch": epoch, "loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1)})
        tqdm.write(
            f"{config.method} epoch {epoch}/{config.epochs}: loss {loss_sum / max(seen, 1):.4f} "
            f"train acc {correct / max(seen, 1):.4f} ({rate:.0f} samples/s)"
        )
    if config.bn_is_trained and config.reestimate_bn and config.method != "finetune":
        reestimate_batchnorm(model, train_set, config)
    try:
        accuracy = evaluate(model, val_set, device=config.device)
    except (OSError, SyntaxError, ValueError, MaskStoreError) as exc:  # unreadable validation data
        accuracy = None
        print(f"warning: validation failed, the trained model is kept without an accuracy: {exc}", file=sys.stderr)
    return TrainResult(
        model=model.eval(), val_accuracy=accuracy, history=history, seconds=time.perf_counter() - started, config=config
    )
