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

On a process group of one rank (-p zero2 and zero2_cpu on one GPU), where there is nothing to communicate,
LowLevelZero still runs its communication machinery:
3. the reduction (`_run_reduction`, after the backward that syncs) copies every gradient into buckets, flattens
   them, divides by one, all-reduces over one rank and copies them back: five passes over 2.2 GB for 1b;
4. the step casts each gradient to float32 (`.to`, twice per tensor) and each updated master weight back to bf16,
   then gathers the weights through 12M-element buckets: a flatten, an all-gather over one rank, and per weight a
   copy out of the bucket and a copy into the model, about 90 buckets and 1,000 small ops for 1b.
On one H100 (1b, micro batch 8, one micro-batch per step) the step took 53 to 66 ms of wall time, the GPU busy 54%
of it; the host spent about 42 ms in the step's Python, 15 of it in the buckets' flatten/all-gather/copy calls and 8
in the `.to` casts. The one-rank replacements register the bucketed gradients as reduced without copying them
(colossalai ends with the same tensors holding the same values), cast all gradients and all updated weights in one
multi-tensor copy each, and write the weights straight into the model: nothing to gather. Parameters, gradients and
optimizer states come out bit-identical to colossalai's (tests/training/test_zero_fixes.py). Several ranks, fp8
or a different communication dtype, overlap_allgather, CPU offload of the step's master weights, or no master
weights: colossalai's own step, unchanged.
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
                        (LowLevelZeroOptimizer, "_unscale_and_clip_grads"): unscale_and_clip_at_once,
                        (LowLevelZeroOptimizer, "_run_reduction"): reduce_unless_alone,
                        (LowLevelZeroOptimizer, "step"): step_without_gathering_when_alone}, ORIGINALS)


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


def nothing_to_communicate(optimizer) -> bool:
    """Whether every process group of the LowLevelZero optimizer has one rank, and its gradients would travel in
    their own dtype (no fp8, no other communication dtype, whose round trip would round them)."""
    return (all(store.world_size == 1 for store in optimizer.pg_to_bucket_store.values())
            and not optimizer._fp8_communication
            and optimizer._communication_dtype in (None, optimizer._dtype))


def reduce_unless_alone(optimizer) -> None:
    """LowLevelZeroOptimizer._run_reduction. On one rank each bucketed gradient is registered as reduced as it is,
    as colossalai does after copying it through the bucket, dividing by one and all-reducing over one rank."""
    if not nothing_to_communicate(optimizer):
        return colossalais_own("_run_reduction")(optimizer)
    for bucket_store in optimizer.pg_to_bucket_store.values():
        if bucket_store.num_elements_in_bucket() <= 0:
            continue
        bucket_store.build_grad_in_bucket()  # moves each param.grad (flattened, a view) into the bucket
        bucket_store.reset_num_elements_in_bucket()
        group_id = bucket_store.current_group_id
        for gradient in bucket_store.get_grad()[0]:
            optimizer._add_grad(gradient, 1, group_id, bucket_store.get_param_id_of_grad(gradient))
        bucket_store.reset()


def steps_alone(optimizer) -> bool:
    """Whether step_without_gathering_when_alone takes its own path: one rank, and colossalai's plain step (master
    weights on the GPU, no overlapped all-gather)."""
    return (nothing_to_communicate(optimizer) and optimizer._master_weights and not optimizer._cpu_offload
            and not optimizer._overlap_allgather)


def step_without_gathering_when_alone(optimizer, closure=None) -> None:
    """LowLevelZeroOptimizer.step. On one rank (`steps_alone`): the same gradients, norm, clipping and update, with
    the float32 gradients and the bf16 weights cast in one multi-tensor copy each and the weights written into the
    model directly; colossalai's step otherwise."""
    from colossalai.zero.low_level._utils import calculate_global_norm_from_list

    if not steps_alone(optimizer):
        return colossalais_own("step")(optimizer, closure)
    assert closure is None, "closure is not supported by step()"
    if not optimizer.require_grad_sync:
        return
    mixin = optimizer.mixed_precision_mixin
    if mixin is not None and mixin.should_skip_step():
        optimizer.zero_grad()
        return
    stepped, master_gradients, norms = {}, [], []
    for group_id in range(optimizer.num_param_groups):
        working, master, gradients = _params_with_gradients(optimizer, group_id)
        copies = [torch.empty_like(gradient, dtype=weight.dtype) for gradient, weight in zip(gradients, master)]
        if copies:
            torch._foreach_copy_(copies, gradients)
        for weight, copy in zip(master, copies):
            weight.grad = copy
        master_gradients.extend(copies)
        norms.append(sum(optimizer._compute_grad_norm(dp_pg=store.torch_pg,
                                                      gradients=store.get_working_grads_by_group_id(group_id))
                         for store in optimizer.pg_to_grad_store.values()))
        optimizer.optim.param_groups[group_id]["params"] = master
        stepped[group_id] = working, master
    optimizer._current_grad_norm = calculate_global_norm_from_list(norms)
    optimizer._unscale_and_clip_grads(master_gradients, optimizer._current_grad_norm)
    optimizer.optim.step()
    for group_id, (working, master) in stepped.items():
        for weight in optimizer._master_param_groups_of_current_rank[group_id]:
            weight.grad = None
        if working:  # one rank's master weight is its whole parameter, flattened: nothing to gather
            torch._foreach_copy_([param.data for param in working],
                                 [weight.view_as(param) for param, weight in zip(working, master)])
        optimizer.optim.param_groups[group_id]["params"] = optimizer._master_param_groups_of_current_rank[group_id]


def _params_with_gradients(optimizer, group_id: int) -> tuple[list, list, list]:
    """The working parameters of param group `group_id` that have a reduced gradient, their master weights and
    those gradients (colossalai skips parameters without one, e.g. a dropped layer's)."""
    working, master, gradients = [], [], []
    for param, weight in zip(optimizer._working_param_groups[group_id],
                             optimizer._master_param_groups_of_current_rank[group_id]):
        reduced = optimizer.pid_to_grad_store[id(param)].get_partitioned_gradients_by_param_id(group_id, id(param))
        if reduced:
            working.append(param)
            master.append(weight)
            gradients.append(reduced[0])
    return working, master, gradients
