"""training/zero_fixes.py: each replacement computes what colossalai's LowLevelZeroOptimizer method computes, in a
few multi-tensor kernels instead of a few per gradient. On the CPU with one and two gloo ranks; the whole plugin runs
with them in tests/training/test_pretrain_cpu.py (-p zero2) and on the GPU in tests/model/test_plugins_gpu.py."""
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from gloo_ranks import run_on_ranks
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
