"""training/zero_fixes.py: each replacement computes what colossalai's LowLevelZeroOptimizer method computes, in a
few multi-tensor kernels instead of a few per gradient. On the CPU with one and two gloo ranks; the whole plugin runs
with them in tests/training/test_pretrain_cpu.py (-p zero2) and on the GPU in tests/model/test_plugins_gpu.py."""
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from gloo_ranks import accelerator_for_low_level_zero, run_on_ranks
from training import zero_fixes


def _gradients(rank: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    return [torch.randn(shape, generator=generator).to(torch.bfloat16) for shape in ((64, 48), (48,), (1000,), (3, 5))]


def _norms_agree(rank: int, world_size: int) -> None:
    gradients = _gradients(rank)
    group = dist.new_group(list(range(world_size)))
    ours = zero_fixes.grad_norm_in_one_pass(None, group, gradients)
    theirs = zero_fixes.colossalais_own("_compute_grad_norm")(None, group, gradients)
    every_rank = torch.cat([g.double().flatten() for r in range(world_size) for g in _gradients(r)])
    assert ours == pytest.approx(theirs, rel=1e-6) and ours == pytest.approx(every_rank.norm().item(), rel=1e-6)
    # a tuple of groups is summed over in turn, as colossalai does (one group of one rank here: the same sum)
    alone = dist.new_group([rank]) if world_size == 1 else None
    if alone is not None:
        assert zero_fixes.grad_norm_in_one_pass(None, (group, alone), gradients) == pytest.approx(ours, rel=1e-7)
    # other norms are colossalai's own
    infinity = zero_fixes.grad_norm_in_one_pass(None, group, gradients, norm_type=float("inf"))
    every_rank_max = every_rank.abs().max().item()
    assert infinity == pytest.approx(every_rank_max)


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_gradient_norm_equals_colossalais_over_the_ranks(world_size):
    run_on_ranks(_norms_agree, world_size=world_size)


def test_no_gradients_have_norm_zero():
    assert zero_fixes.grad_norm_in_one_pass(None, None, []) == 0.0


def _optimizer(clip: float, div_scale: float = 1.0):
    mixin = SimpleNamespace(get_grad_div_scale=lambda: div_scale)
    return SimpleNamespace(mixed_precision_mixin=mixin, _clip_grad_norm=clip)


@pytest.mark.parametrize("clip, total_norm, div_scale", [(1.0, 5.0, 1.0), (1.0, 0.5, 1.0), (0.0, 5.0, 1.0),
                                                         (1.0, 5.0, 1024.0)],
                         ids=["clipped", "under-the-limit", "no-clipping", "fp16-loss-scale"])
def test_unscale_and_clip_gives_colossalais_gradients(clip, total_norm, div_scale):
    before = [g.float() for g in _gradients()]
    theirs, ours = [g.clone() for g in before], [g.clone() for g in before]
    zero_fixes.colossalais_own("_unscale_and_clip_grads")(_optimizer(clip, div_scale), theirs, total_norm)
    zero_fixes.unscale_and_clip_at_once(_optimizer(clip, div_scale), ours, total_norm)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    factor = max(1.0, (total_norm / div_scale + 1e-6) / clip) * div_scale if clip else div_scale
    for a, b in zip(ours, before):  # and that is the clipped (or unscaled) gradient
        torch.testing.assert_close(a, b / factor)


# ---- one rank: the reduction and the step without communication -------------------------------------------------

class _WithUnusedLayer(torch.nn.Module):
    """Three layers, one of which never gets a gradient (colossalai steps only the parameters that have one)."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.unused = torch.nn.Linear(12, 20), torch.nn.Linear(20, 6), torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.second(torch.nn.functional.silu(self.first(x)))


def _train_low_level_zero(stage: int, clip: float, steps: int = 3, micro_batches: int = 2):
    """A bf16 model trained by LowLevelZeroOptimizer on one rank: weights, master weights, Adam moments and the
    gradient norm after each step. Buckets of 100 elements, so gradients and weights span several."""
    from colossalai.zero.low_level.low_level_optim import LowLevelZeroOptimizer

    torch.manual_seed(0)
    model = _WithUnusedLayer().to(torch.bfloat16)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    adam = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2)
    optimizer = LowLevelZeroOptimizer(adam, clip_grad_norm=clip, reduce_bucket_size=100, partition_grad=stage == 2,
                                      overlap_communication=False)
    norms = []
    for step in range(steps):
        for index in range(micro_batches):
            x = torch.randn(5, 12, dtype=torch.bfloat16)
            # stage 1 accumulates under no_sync (as the loop does); stage 2 refuses it and adds reduced gradients
            defer = stage == 1 and index < micro_batches - 1
            with optimizer.no_sync() if defer else nullcontext():
                optimizer.backward(model(x).float().square().mean())
        optimizer.step()
        norms.append(optimizer._current_grad_norm)
        optimizer.zero_grad()
    masters = [w.clone() for group in optimizer._master_param_groups_of_current_rank.values() for w in group]
    moments = [state[key].clone() for state in adam.state.values() for key in ("exp_avg", "exp_avg_sq")]
    return [p.detach().clone() for p in model.parameters()], masters, moments, norms


def _one_rank_matches_colossalai(rank: int, world_size: int, stage: int, clip: float) -> None:
    from unittest import mock

    from colossalai.accelerator import set_accelerator
    from colossalai.zero.low_level.low_level_optim import LowLevelZeroOptimizer

    set_accelerator(accelerator_for_low_level_zero())
    zero_fixes.apply()
    ours = _train_low_level_zero(stage, clip)
    with mock.patch.object(LowLevelZeroOptimizer, "step", zero_fixes.colossalais_own("step")), \
            mock.patch.object(LowLevelZeroOptimizer, "_run_reduction", zero_fixes.colossalais_own("_run_reduction")):
        theirs = _train_low_level_zero(stage, clip)
    for kind, mine, colossalais in zip(("weights", "master weights", "moments"), ours[:3], theirs[:3]):
        assert len(mine) == len(colossalais) > 0, kind
        for a, b in zip(mine, colossalais):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{kind}: {m}")
    assert ours[3] == theirs[3] and all(norm > 0 for norm in ours[3])
    torch.manual_seed(0)  # the weights training started from
    weights_before = [p.detach() for p in _WithUnusedLayer().to(torch.bfloat16).parameters()]
    changed = [not torch.equal(a, b) for a, b in zip(ours[0], weights_before)]
    assert changed == [True, True, True, True, False, False]  # trained, but the unused layer


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("clip", [1e-3, 0.0], ids=["clipped", "unclipped"])
def test_one_rank_trains_bit_identically_to_colossalais_step(stage, clip):
    run_on_ranks(_one_rank_matches_colossalai, stage, clip, world_size=1)


def _one_rank_step_ops(rank: int, world_size: int) -> None:
    from unittest import mock

    from colossalai.accelerator import set_accelerator
    from colossalai.zero.low_level.low_level_optim import LowLevelZeroOptimizer
    from dispatched_ops import DispatchedOps

    set_accelerator(accelerator_for_low_level_zero())
    zero_fixes.apply()
    counts = {}
    for name, step in (("theirs", zero_fixes.colossalais_own("step")), ("ours", LowLevelZeroOptimizer.step)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(10)]).to(torch.bfloat16)  # 20 tensors
        optimizer = LowLevelZeroOptimizer(torch.optim.AdamW(model.parameters(), foreach=True), clip_grad_norm=1.0,
                                          reduce_bucket_size=100, overlap_communication=False)
        optimizer.backward(model(torch.randn(2, 8, dtype=torch.bfloat16)).float().sum())
        optimizer.optim.step = lambda: None  # Adam's own ops are the same in both
        with DispatchedOps() as ops, mock.patch.object(LowLevelZeroOptimizer, "step", step):
            optimizer.step()
        # allocations, views and .data launch nothing
        counts[name] = [str(op) for op in ops.calls if not any(k in str(op) for k in ("empty", "view", "detach"))]
    # colossalai casts, buckets and copies each of the 20 tensors; one rank's step runs multi-tensor ops only
    assert len(counts["theirs"]) >= 60 and len(counts["ours"]) <= 12, counts


def test_one_rank_step_casts_and_writes_back_all_tensors_at_once():
    run_on_ranks(_one_rank_step_ops, world_size=1)


@pytest.mark.parametrize("sizes, fp8, dtype, alone", [
    ((1,), False, None, True), ((1, 1), False, torch.bfloat16, True), ((2,), False, None, False),
    ((1,), True, None, False), ((1,), False, torch.float16, False),
], ids=["one-rank", "one-rank-groups", "two-ranks", "fp8", "other-communication-dtype"])
def test_only_one_rank_in_its_own_dtype_has_nothing_to_communicate(sizes, fp8, dtype, alone):
    stores = {index: SimpleNamespace(world_size=size) for index, size in enumerate(sizes)}
    optimizer = SimpleNamespace(pg_to_bucket_store=stores, _fp8_communication=fp8, _communication_dtype=dtype,
                                _dtype=torch.bfloat16)
    assert zero_fixes.nothing_to_communicate(optimizer) is alone


def test_zero2_overlaps_its_reduction_only_on_several_gpus():
    from training.plugins import overlaps_zero_communication

    assert [overlaps_zero_communication(n) for n in (1, 2, 8)] == [False, True, True]
