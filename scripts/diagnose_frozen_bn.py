r"""Diagnostic (not a test, not a product setting): why frozen-BN Piggyback collapses on mobilenet_v2.

About a third of the ImageNet mobilenet_v2's BN channels have a running variance below 1e-3, many
exactly 0; with the backbone's BN frozen, a change in such a channel is divided by about
sqrt(eps) = 3e-3. This trains frozen-BN Piggyback (the accuracy benchmark's configuration, reported
on the held-out part of mnist's *training* split, as `--select` does) after raising every running
variance below FLOOR to FLOOR, and prints the held-out accuracy and the mask density. If the
collapse disappears with a floor, those channels are what breaks it. A floor changes the backbone
(every task's frozen BN), so it is a diagnosis, not a fix the server could apply.

    .venv/bin/python scripts/diagnose_frozen_bn.py --floor 0 --floor 1e-4 --floor 1e-3
    .venv/bin/python scripts/diagnose_frozen_bn.py --floor 1e-3 --method classifier
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.benchmark import PRESETS, backbone_for, method_config, task_preprocess, task_split  # noqa: E402
from training.masking import MaskedLayer  # noqa: E402
from training.trainer import train_task  # noqa: E402


def floor_running_variances(model: torch.nn.Module, floor: float) -> int:
    """Raise every BN running variance below `floor` to it; returns how many channels changed."""
    raised = 0
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            raised += int((module.running_var < floor).sum())
            module.running_var.clamp_(min=floor)
    return raised


def mask_density(model: torch.nn.Module, threshold: float) -> float | None:
    kept = total = 0
    for module in model.modules():
        if isinstance(module, MaskedLayer):
            kept += int((module.scores > threshold).sum())
            total += module.scores.numel()
    return kept / total if total else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--floor", type=float, action="append", required=True, help="0 = the backbone as it is")
    parser.add_argument("--method", default="piggyback", choices=["piggyback", "classifier"])
    parser.add_argument("--lr-scores", type=float, default=1e-4, help="frozen-BN score rate (the paper's)")
    parser.add_argument("--task", default="mnist")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(PRESETS["default"], select=True, tasks=(args.task,), lr_scores_frozen_bn=args.lr_scores)
    preprocess = task_preprocess(cfg)
    train, held_out, classes = task_split(args.task, cfg, preprocess)
    config = method_config(args.method, cfg)
    print(f"{args.method}, frozen BN, score lr {config.lr_scores:g}; {args.task}: {len(train)} train, "
          f"{len(held_out)} held out of the training split; {cfg.epochs} epochs")  # fmt: skip
    print("| variance floor | channels raised | held-out accuracy | mask density |")
    print("|---|---|---|---|")
    for floor in args.floor:
        backbone, _, _ = backbone_for(cfg, preprocess)
        raised = floor_running_variances(backbone, floor) if floor > 0 else 0
        result = train_task(backbone, train, held_out, len(classes), config)
        density = mask_density(result.model, config.mask.threshold)
        shown = f"{density:.4f}" if density is not None else "-"
        print(f"| {floor:g} | {raised} | {100 * result.val_accuracy:.2f} | {shown} |", flush=True)


if __name__ == "__main__":
    main()
