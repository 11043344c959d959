"""Costs colossalai 0.5.0's LowLevelZero optimizer (-p zero2, zero2_cpu) pays in every optimizer step, removed at the
narrowest point.

Before stepping, LowLevelZeroOptimizer
1. takes the gradient norm for clipping one gradient at a time (`_compute_grad_norm`): a float64 copy of each
   gradient, its norm, a power and an addition, four kernels per parameter tensor (about 800 for the 1b model) and
   a float64 copy of every gradient (8.8 GB written for 1b), then one `.item()`;
2. multiplies each gradient by the clipping factor (`_unscale_and_clip_grads`), one kernel per tensor, even when the
   factor is exactly 1 (the norm is under the limit, and bf16 has no loss scale to undo).
On one H100 (1b, -p zero2, micro batch 16) the step's kernels took 35 ms of GPU time but 85-94 ms of wall time, the
GPU waiting on the host's launches for the rest.

The replacements compute the same values in a handful of multi-tensor kernels: the per-tensor norms in float32
(as torch's clip_grad_norm_ and Gemini take them) summed in float64, and one multiplication over all gradients
only when the factor is not 1 (tests/training/test_zero_fixes.py). test_colossalai_workarounds.py shows colossalai's
own norm launching kernels per gradient; drop the matching replacement when that test fails.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .colossalai_patches import own_attribute, replace_attributes

ORIGINALS: dict = {}  # (class, attribute) -> colossalai's own LowLevelZeroOptimizer function, kept by apply()


def apply() -> None:
    """Install the replacements on colossalai's LowLevelZeroOptimizer (once; later calls do nothing)."""
    from colossalai.zero.low_level.low_level_optim import LowLevelZeroOptimizer

    replace_attributes({(LowLevelZeroOptimizer, "_compute_grad_norm"): grad_norm_in_one_pass,
                        (LowLevelZeroOptimizer, "_unscale_and_clip_grads"): unscale_and_clip_at_once}, ORIGINALS)


def colossalais_own(name: str):
    """LowLevelZeroOptimizer's function `name` as it was before apply()."""
    from colossalai.zero.low_level.low_level_optim import LowLevelZeroOptimizer

    return own_attribute(ORIGINALS, LowLevelZeroOptimizer, name)


def grad_norm_in_one_pass(optimizer, dp_pg, gradients: list[torch.Tensor], norm_type: float = 2) -> float:
    """LowLevelZeroOptimizer._compute_grad_norm for the 2-norm: the norm of `gradients` over the ranks of dp_pg (a
    group, or a tuple of groups to sum over in turn), as a Python float. Other norms are colossalai's."""
    if float(norm_type) != 2.0:
        return colossalais_own("_compute_grad_norm")(optimizer, dp_pg, gradients, norm_type)
    if len(gradients) == 0:
        return 0.0
    norms = torch._foreach_norm(gradients, 2.0, dtype=torch.float32)
    squares = torch.stack(norms).double().square().sum().float().reshape(1)  # colossalai sums a float32 tensor
    for group in dp_pg if isinstance(dp_pg, tuple) else (dp_pg,):
        dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=group)
    return squares.item() ** 0.5


def unscale_and_clip_at_once(optimizer, gradients: list[torch.Tensor], total_norm: float) -> None:
    """LowLevelZeroOptimizer._unscale_and_clip_grads: the same factor, one multi-tensor multiplication, none at 1."""
    div_scale = 1.0
    if optimizer.mixed_precision_mixin is not None:
        div_scale = optimizer.mixed_precision_mixin.get_grad_div_scale()
    if optimizer._clip_grad_norm > 0.0:
        clip = ((total_norm / div_scale) + 1e-6) / optimizer._clip_grad_norm  # colossalai's formula
        if clip > 1:
            div_scale = clip * div_scale
    if div_scale != 1.0 and gradients:
        torch._foreach_mul_(gradients, 1.0 / div_scale)
