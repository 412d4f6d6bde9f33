"""One forward over images of different tasks.

Every task has exactly the backbone's shapes, so a batch of N images of several tasks can run as one
forward in which each module whose tensors differ between the images runs per sample:
- a Conv2d becomes one grouped conv: input [1, N*C, H, W], the images' weights stacked as
  [N*O, C/g, k, k], groups N*g;
- a BatchNorm2d (eval) becomes a per-sample scale and shift;
- a Linear becomes a batched matmul. Heads of different sizes are zero-padded to the widest; each
  image's logits are cut back to its own labels.
Modules no task substitutes run as usual over the whole batch. The model's own forward code (residual
adds, channel shuffles, concatenations) is untouched, so every family whose substituted modules are of
these three kinds can mix: the supported families all are (masks live on Conv2d/Linear, per-task
normalisation is BatchNorm2d, heads are Linear). A substituted module of any other kind raises
`NotMixable` and the engine runs that batch per task.

The stacked tensors are carved from one arena allocated once (PIGGYBACK_MIXED_BUDGET_MB): a fresh
B-times-the-backbone allocation per batch is what makes glibc keep freed memory and grow the process.
Stacking copies each task's masked weights out of the task-weight cache into the arena, one copy per
stacked tensor for the whole batch. The alternative, the mask-apply kernel writing each task straight
into a sample-major stacked buffer, was measured 2.0x slower end to end (mobilenet_v2, 32 px, 8 tasks,
2-core CPU: 5.65 against 2.78 ms per image; `scripts/bench_mixed.py`, docs/benchmarks.md): the per-layer
weight views are then strided, every grouped conv copies its weight to make it contiguous, so the
bytes are copied anyway, and a cached task pays a fresh mask-apply on top. On that CPU the copy is
the floor of the mixed path (about 1.8 ms per image for mobilenet_v2's 8.9 MB of masked weights, ~5 GB/s); on a GPU it
is microseconds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

PER_SAMPLE = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _used(name: str) -> bool:
    return not name.endswith(".num_batches_tracked")  # BatchNorm's step counter: unused in eval


class NotMixable(Exception):
    """This batch substitutes a tensor of a module that cannot run per sample."""


def _why_not_per_sample(module: nn.Module) -> str | None:
    if not isinstance(module, PER_SAMPLE):
        return f"{type(module).__name__} cannot run per sample"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"Conv2d with padding_mode={module.padding_mode!r}"
    if isinstance(module, nn.BatchNorm2d) and not module.track_running_stats:
        return "BatchNorm2d without running statistics normalises over the batch"
    return None


@dataclass(eq=False)
class MixedBatch:
    """The stacked tensors of one mixed batch: `stacked[module][tensor]` has one row per image."""

    rows: list[slice]  # each group's images in the batch
    stacked: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    filled: list[bool] = field(default_factory=list)


class MixedForward:
    """Runs `backbone` over images whose groups each bring their own substituted tensors."""

    def __init__(self, backbone: nn.Module, budget_bytes: int) -> None:
        self.backbone = backbone
        self.budget_bytes = int(budget_bytes)
        self._modules = dict(backbone.named_modules())
        self._arena: torch.Tensor | None = None
        self._used = 0

    def max_samples(self, sample_bytes: int) -> int:
        """Images a mixed batch may hold within the arena budget (0 or 1: mixing is off)."""
        return self.budget_bytes // max(sample_bytes, 1)

    # --- building a batch ------------------------------------------------------------------------
    def prepare(self, shapes: Sequence[dict[str, torch.Size]], counts: Sequence[int]) -> MixedBatch:
        """Room for a batch whose group i has counts[i] images and substitutes tensors of `shapes[i]`
        (name -> shape); raises NotMixable if one of them cannot run per sample."""
        starts = [sum(counts[:i]) for i in range(len(counts))]
        batch = MixedBatch(rows=[slice(s, s + c) for s, c in zip(starts, counts, strict=True)])
        batch.filled = [False] * len(counts)
        owners = sorted({name.rpartition(".")[0] for group in shapes for name in group if _used(name)})
        self._used = 0
        for owner in owners:
            module = self._modules.get(owner)
            if module is None:
                raise NotMixable(f"{owner} is not a module of the backbone")
            if (why := _why_not_per_sample(module)) is not None:
                raise NotMixable(f"{owner}: {why}")
            for key in self._tensors_of(module):
                own = getattr(module, key)
                rows = [group.get(f"{owner}.{key}", None if own is None else own.shape) for group in shapes]
                if any(shape is None for shape in rows):
                    if any(shape is not None for shape in rows):
                        raise NotMixable(f"{owner}.{key} is substituted by some tasks but absent in the backbone")
                    continue  # an absent bias
                widest = max(rows, key=lambda shape: shape[0])
                stacked = self._take((sum(counts), *widest), own.dtype, own.device)
                if any(shape[0] != widest[0] for shape in rows):
                    stacked.zero_()  # padded head rows: logits 0, cut away afterwards
                batch.stacked.setdefault(owner, {})[key] = stacked
        return batch

    @staticmethod
    def _tensors_of(module: nn.Module) -> tuple[str, ...]:
        return BN_TENSORS if isinstance(module, nn.BatchNorm2d) else ("weight", "bias")

    def fill(self, batch: MixedBatch, group: int, tensors: dict[str, torch.Tensor]) -> None:
        """Copy group `group`'s tensors (or the backbone's own where it substitutes none) into its rows.
        Call it right after materializing them: the next task's weights may reuse the same buffer."""
        rows = batch.rows[group]
        for owner, keys in batch.stacked.items():
            for key, stacked in keys.items():
                source = self._source(tensors, owner, key)
                stacked[rows, : source.shape[0]] = source
        batch.filled[group] = True

    def fill_all(self, batch: MixedBatch, tensors: Sequence[dict[str, torch.Tensor]]) -> None:
        """Every group at once, one copy per stacked tensor rather than one per tensor and group (at 32 px
        the per-copy overhead, some 260 tensors per task on mobilenet_v2, cost more than the forward).
        Only while every group's tensors are alive together (the engine checks its cache held them)."""
        repeats = [r.stop - r.start for r in batch.rows]
        for owner, keys in batch.stacked.items():
            for key, stacked in keys.items():
                sources = [self._source(group, owner, key) for group in tensors]
                if any(source.shape != stacked.shape[1:] for source in sources):  # a padded head: per group
                    for rows, source in zip(batch.rows, sources, strict=True):
                        stacked[rows, : source.shape[0]] = source
                else:
                    torch.stack([s for s, n in zip(sources, repeats, strict=True) for _ in range(n)], out=stacked)
        batch.filled = [True] * len(batch.rows)

    def _source(self, tensors: dict[str, torch.Tensor], owner: str, key: str) -> torch.Tensor:
        source = tensors.get(f"{owner}.{key}")
        return getattr(self._modules[owner], key) if source is None else source

    def _take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor carved from the arena (allocated once, at the budget); beyond it, a fresh one."""
        numel = 1
        for size in shape:
            numel *= size
        if self._arena is None or self._arena.dtype != dtype or self._arena.device != device:
            itemsize = torch.empty((), dtype=dtype).element_size()
            self._arena = torch.empty(self.budget_bytes // itemsize, dtype=dtype, device=device)
            self._used = 0
        start = -(-self._used // 16) * 16  # 64-byte aligned for vector loads
        if start + numel > self._arena.numel():
            return torch.empty(shape, dtype=dtype, device=device)
        self._used = start + numel
        return self._arena[start : start + numel].view(shape)

    # --- the forward -----------------------------------------------------------------------------
    def run(self, batch: MixedBatch, images: torch.Tensor) -> torch.Tensor:
        """Logits [N, widest head] of the batch; group i's are rows batch.rows[i], its own labels first."""
        if not all(batch.filled):
            raise RuntimeError("every group of a mixed batch must be filled before the forward")
        with self._per_sample(batch):
            return self.backbone(images)

    @contextlib.contextmanager
    def _per_sample(self, batch: MixedBatch) -> Iterator[None]:
        patched = []
        try:
            for owner, tensors in batch.stacked.items():
                module = self._modules[owner]
                module.forward = _per_sample_forward(module, tensors)
                patched.append(module)
            yield
        finally:
            for module in patched:
                del module.forward  # the class's forward again


def _per_sample_forward(module: nn.Module, tensors: dict[str, torch.Tensor]):
    if isinstance(module, nn.Conv2d):
        return lambda x: conv2d_per_sample(module, x, tensors["weight"], tensors.get("bias"))
    if isinstance(module, nn.Linear):
        return lambda x: linear_per_sample(x, tensors["weight"], tensors.get("bias"))
    return lambda x: batch_norm_per_sample(module, x, tensors)


def conv2d_per_sample(module: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """x [N, C, H, W], weight [N, O, C/g, k, k]: one grouped conv, sample i through weight[i]."""
    n, c, h, w = x.shape
    out = F.conv2d(
        x.reshape(1, n * c, h, w),
        weight.reshape(-1, *weight.shape[2:]),
        None if bias is None else bias.reshape(-1),
        module.stride,
        module.padding,
        module.dilation,
        module.groups * n,
    )
    return out.reshape(n, -1, *out.shape[2:])


def linear_per_sample(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [N, ..., in], weight [N, O, in]: sample i through weight[i] (a batched matmul)."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    if bias is None:
        out = torch.bmm(flat, weight.transpose(1, 2))
    else:
        out = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
    return out.reshape(*x.shape[:-1], weight.shape[1])


def batch_norm_per_sample(module: nn.BatchNorm2d, x: torch.Tensor, tensors: dict[str, torch.Tensor]):
    """Eval-mode BatchNorm with each sample's own statistics and affine parameters."""
    scale = torch.rsqrt(tensors["running_var"] + module.eps)
    if "weight" in tensors:
        scale = scale * tensors["weight"]
    shift = -tensors["running_mean"] * scale
    if "bias" in tensors:
        shift = shift + tensors["bias"]
    return torch.addcmul(shift[:, :, None, None], x, scale[:, :, None, None])
