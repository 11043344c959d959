"""Which plugins let the loop skip the gradient reduction of all micro-batches of a step but the last
(training/plugins.py zero_stage and defers_grad_sync; the GPU side is tests/model/test_plugins_gpu.py)."""
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import pytest
import torch

from model.kernels import in_place_grads
from training.loop import Trainer
from training.plugins import LOW_LEVEL_ZERO_PLUGINS, defers_grad_sync, zero_stage


def test_zero2_runs_lowlevelzero_stage_1_only_on_one_gpu_and_zero1_everywhere():
    assert [zero_stage(world_size) for world_size in (1, 2, 8)] == [1, 2, 2]
    assert [zero_stage(world_size, "zero2_cpu") for world_size in (1, 2, 8)] == [1, 2, 2]
    assert [zero_stage(world_size, "zero1") for world_size in (1, 2, 8)] == [1, 1, 1]


def plugin_supporting_no_sync(plugin_name: str, world_size: int) -> SimpleNamespace:
    """What colossalai's plugins answer to support_no_sync() as training/plugins.py builds them: TorchDDPPlugin and
    HybridParallelPlugin True, GeminiPlugin False, LowLevelZeroPlugin True at stage 1 only."""
    if plugin_name in LOW_LEVEL_ZERO_PLUGINS:
        supports = zero_stage(world_size, plugin_name) == 1
    else:
        supports = plugin_name in ("ddp", "hybrid_parallel")
    return SimpleNamespace(support_no_sync=lambda: supports)


class FlagReadInBackward:
    """A booster as LowLevelZero behaves: no_sync clears a flag that its backward (the gradient hooks) reads, so only
    a backward run inside the context skips the reduction. Records, per backward, whether it reduced and whether
    the linear layers summed their weight gradients in place (model/kernels/concat_linear.py)."""

    def __init__(self):
        self.require_grad_sync = True
        self.reduced: list[bool] = []
        self.summed_in_place: list[bool] = []

    @contextmanager
    def no_sync(self, model, optimizer):
        self.require_grad_sync = False
        try:
            yield
        finally:
            self.require_grad_sync = True

    def backward(self, loss, optimizer):
        loss.backward()
        self.reduced.append(self.require_grad_sync)
        self.summed_in_place.append(in_place_grads._sum_weight_grads_in_place)


def fake_trainer(booster, defers: bool) -> SimpleNamespace:
    """Just what Trainer.train_step and _micro_batch read, around a model whose loss is the labels' mean times one
    weight, on the CPU with one rank."""
    weight = torch.nn.Parameter(torch.ones(()))

    def model(**batch):
        return weight * batch["labels"].float().mean()

    model.train = lambda: None
    trainer = SimpleNamespace(
        model=model, pipelined=False, device=torch.device("cpu"), booster=booster, defers_grad_sync=defers,
        optimizer=SimpleNamespace(step=lambda: None, zero_grad=lambda: None), autocast=nullcontext(),
        data_ranks=1, _to_device=lambda t: t, _labelled_over_ranks=float, _sum_over_ranks=lambda t: t,
        _clip_and_norm=lambda: None)
    trainer._micro_batch = lambda *args: Trainer._micro_batch(trainer, *args)
    return trainer


@pytest.mark.parametrize("plugin, world_size, deferred", [
    ("ddp", 1, True), ("ddp", 4, True), ("zero2", 1, True), ("zero2_cpu", 1, True), ("zero2", 2, False),
    ("zero2_cpu", 2, False), ("zero1", 1, True), ("zero1", 2, True), ("zero1", 8, True), ("gemini", 1, False), ("gemini_auto", 1, False), ("hybrid_parallel", 1, False),
])
def test_the_loop_defers_gradient_sync_only_where_the_plugin_allows(plugin, world_size, deferred):
    calls = []
    booster = FlagReadInBackward()
    booster.no_sync = lambda model, optimizer: calls.append("no_sync") or nullcontext()
    supports = plugin_supporting_no_sync(plugin, world_size)
    trainer = fake_trainer(booster, defers_grad_sync(plugin, supports))
    batch = {"labels": torch.ones(1, 4)}
    Trainer._micro_batch(trainer, batch, 4, 1.0, sync=False)  # a micro-batch before the step's last
    Trainer._micro_batch(trainer, batch, 4, 1.0, sync=True)  # the last: always reduces
    assert calls == (["no_sync"] if deferred else [])


@pytest.mark.parametrize("defers", [True, False])
def test_train_step_runs_each_backward_but_the_last_inside_no_sync(defers):
    booster = FlagReadInBackward()
    trainer = fake_trainer(booster, defers)
    micro_batches = [{"labels": torch.full((1, 4), float(i))} for i in range(3)]
    result = Trainer.train_step(trainer, micro_batches)
    # one reduction per optimizer step, after the last micro-batch; the others sum their gradients in place
    assert booster.reduced == ([False, False, True] if defers else [True, True, True])
    assert booster.summed_in_place == ([True, True, False] if defers else [False, False, False])
    assert not in_place_grads._sum_weight_grads_in_place  # switched off again after the step
    assert result.finite and result.loss == pytest.approx((0 + 4 + 8) / 12)
