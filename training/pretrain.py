"""Supervised pretraining of a backbone on offline data: it plays the role of the ImageNet backbone."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mask_store import build_backbone, replace_head
from training.trainer import evaluate


def pretrain_backbone(
    arch: str,
    train_set: Dataset,
    test_set: Dataset,
    num_classes: int,
    *,
    epochs: int = 2,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> tuple[nn.Module, float, float]:
    """Train `arch` from scratch (Adam, cosine decay); returns (model in eval mode, test accuracy, seconds)."""
    torch.manual_seed(seed)
    model = build_backbone(arch)
    replace_head(model, num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        drop_last=len(train_set) > batch_size,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(loader))
    loss_fn = nn.CrossEntropyLoss()
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        for images, labels in tqdm(loader, desc=f"pretrain {arch} epoch {epoch}/{epochs}", disable=not progress):
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    accuracy = evaluate(model, test_set)
    return model.eval(), accuracy, time.perf_counter() - started
