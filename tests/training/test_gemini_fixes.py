"""training/gemini_fixes.py: each replacement computes what colossalai's Gemini method computes, without its cost.

The chunks here are colossalai's own Chunk and ChunkManager on the CPU, with one and two gloo ranks; the GPU run
through the whole plugin is tests/model/test_plugins_gpu.py test_gemini_fixes_keep_the_accumulated_steps.
"""
import logging
from unittest import mock

import pytest
import torch

from gemini_chunks import gradient_chunk
from gloo_ranks import run_on_ranks
from training import gemini_fixes


@pytest.mark.parametrize("gathered", [True, False])
def test_the_gradient_norm_stays_on_the_device_and_equals_colossalais(gathered):
    from colossalai.zero.gemini.chunk import Chunk

    values = torch.randn(11, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    theirs = gradient_chunk(values, gathered)
    gemini_fixes.colossalais_own(Chunk, "set_l2_norm")(theirs)
    ours = gradient_chunk(values, gathered)
    with mock.patch.object(torch.Tensor, "item", side_effect=AssertionError("a host synchronisation")):
        gemini_fixes.set_l2_norm_on_gpu(ours)
    assert isinstance(ours.l2_norm, torch.Tensor) and ours.l2_norm.dtype == torch.float64
    assert float(ours.l2_norm) == pytest.approx(theirs.l2_norm, rel=1e-6)  # float32 norms, summed in another order
    assert float(ours.l2_norm) == pytest.approx(values.double().square().sum().item(), rel=1e-6)


def test_the_optimizer_adds_norms_kept_on_the_device_into_one_float():
    """GeminiOptimizer._calc_global_norm, colossalai's own, over chunks whose norms set_l2_norm_on_gpu recorded."""
    from types import SimpleNamespace

    from colossalai.zero.gemini.gemini_optimizer import GeminiOptimizer

    chunks = [gradient_chunk(torch.full((4,), float(i + 1)), gathered=True) for i in range(3)]
    for chunk in chunks:
        gemini_fixes.set_l2_norm_on_gpu(chunk)
    optimizer = SimpleNamespace(chunk16_set=chunks,
                                module=SimpleNamespace(chunk_manager=SimpleNamespace(reuse_fp16_chunk=True)))
    norm = GeminiOptimizer._calc_global_norm(optimizer)
    assert isinstance(norm, float) and norm == pytest.approx((4 * (1 + 4 + 9)) ** 0.5)
    assert all(chunk.l2_norm is None for chunk in chunks)  # cleared for the next step, as colossalai does


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [None, float("inf"), float("nan")])
def test_only_fp16_gradients_are_checked_for_overflow(dtype, bad):
    values = torch.ones(6, dtype=dtype)
    if bad is not None:
        values[2] = bad
    result = gemini_fixes.has_inf_or_nan_unless_bf16(gradient_chunk(values, gathered=False))
    if dtype == torch.bfloat16:
        assert result is False  # nothing reads a bf16 run's overflow count
    else:
        assert bool(result) == (bad is not None)


def _rearranged(group, keep_gathered: bool, offloaded: bool, use_ours: bool, rank: int) -> tuple:
    """A grad chunk of two parameters through one micro-batch's reduction (colossalai's own scatter) and the
    next micro-batch's rearrangement, colossalai's or ours: the state the next gradients are added to."""
    from colossalai.zero.gemini.chunk import Chunk, ChunkManager

    cpu = torch.device("cpu")
    chunk = Chunk(chunk_size=16, zero_group=group, dtype=torch.bfloat16, init_device=cpu, keep_gathered=keep_gathered)
    for size in (5, 6):
        chunk.append_tensor(torch.zeros(size, dtype=torch.bfloat16))
    chunk.close_chunk()
    manager = ChunkManager({}, init_device=cpu)
    grad_chunk = manager.init_grad_chunk(chunk)
    grad_chunk.cuda_global_chunk.copy_(torch.arange(16) * 0.37 + rank)  # this micro-batch's gradients
    grad_chunk._Chunk__scatter()  # what reduce() leaves on one rank; kept gathered, it leaves the chunk as it is
    if offloaded and not grad_chunk.is_gathered:
        grad_chunk.cpu_shard, grad_chunk.cuda_shard = grad_chunk.cuda_shard, None
    manager.accessed_chunks.discard(grad_chunk)
    rearrange = (gemini_fixes.rearrange_accumulated_grad_chunk_in_place if use_ours
                 else gemini_fixes.colossalais_own(ChunkManager, "rearrange_accumulated_grad_chunk"))
    result = rearrange(manager, chunk)
    return (result is chunk.grad_chunk, result.is_gathered, result.cuda_shard is None, result in manager.accessed_chunks,
            result.cuda_global_chunk.clone())


def _rearrangements_agree(rank, world_size):
    import torch.distributed as dist

    own = [dist.new_group([r]) for r in range(world_size)][rank]  # every rank creates every group
    for group in (own, dist.group.WORLD):
        for keep_gathered in (False, True):
            for offloaded in (False, True):
                theirs = _rearranged(group, keep_gathered, offloaded, use_ours=False, rank=rank)
                ours = _rearranged(group, keep_gathered, offloaded, use_ours=True, rank=rank)
                case = f"ranks {dist.get_world_size(group)}, keep_gathered {keep_gathered}, offloaded {offloaded}"
                assert ours[:4] == theirs[:4] == (True, True, True, True), case
                assert torch.equal(ours[4], theirs[4]), f"{case}: {ours[4]} vs {theirs[4]}"
                assert ours[4].abs().sum() > 0, case


def test_rearranging_accumulated_gradients_in_place_gives_colossalais_chunk():
    """On one rank and on two: a scattered chunk, one kept gathered, and one whose gradients were moved to the CPU."""
    run_on_ranks(_rearrangements_agree, world_size=2)


def test_apply_installs_each_replacement_once():
    from colossalai.zero.gemini.chunk import Chunk, ChunkManager
    from colossalai.zero.gemini.gemini_ddp import GeminiDDP

    from colossalai.logging import DistributedLogger

    patched = [(GeminiDDP, "grad_handle"), (Chunk, "set_l2_norm"), (Chunk, "has_inf_or_nan"),
               (ChunkManager, "rearrange_accumulated_grad_chunk"), (DistributedLogger, "debug")]
    saved = {(cls, name): gemini_fixes.colossalais_own(cls, name) for cls, name in patched}
    try:
        with mock.patch.dict(gemini_fixes.ORIGINALS, clear=True), \
                mock.patch.object(gemini_fixes, "_colossalai_grad_handle", None):
            for (cls, name), original in saved.items():
                setattr(cls, name, original)
            gemini_fixes.apply()
            gemini_fixes.apply()
            assert GeminiDDP.grad_handle is gemini_fixes.grad_handle_then_wait_for_its_stream
            assert Chunk.set_l2_norm is gemini_fixes.set_l2_norm_on_gpu
            assert Chunk.has_inf_or_nan.fget is gemini_fixes.has_inf_or_nan_unless_bf16
            assert ChunkManager.rearrange_accumulated_grad_chunk is gemini_fixes.rearrange_accumulated_grad_chunk_in_place
            assert DistributedLogger.debug is gemini_fixes.debug_only_when_enabled
            assert gemini_fixes.ORIGINALS == saved
            assert gemini_fixes._colossalai_grad_handle is saved[GeminiDDP, "grad_handle"].__func__
    finally:
        for (cls, name), original in saved.items():
            setattr(cls, name, original)


def test_the_backward_waits_for_the_reduction_stream_after_each_gradient():
    """grad_handle_then_wait_for_its_stream runs colossalai's grad_handle, then orders the current stream after the
    reduction stream it was given (none: nothing to wait for)."""
    calls = []
    stream = mock.Mock()
    handle = lambda grad, *args, async_reduce_stream=None, **kwargs: calls.append(("handle", async_reduce_stream)) or grad
    current = mock.Mock(wait_stream=lambda s: calls.append(("wait", s)))
    with mock.patch.object(gemini_fixes, "_colossalai_grad_handle", handle), \
            mock.patch.object(torch.cuda, "current_stream", return_value=current):
        assert gemini_fixes.grad_handle_then_wait_for_its_stream("g", 1, p=2, async_reduce_stream=stream) == "g"
        assert gemini_fixes.grad_handle_then_wait_for_its_stream("h", async_reduce_stream=None) == "h"
    assert calls == [("handle", stream), ("wait", stream), ("handle", None)]


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_debug_logging_costs_nothing_while_debug_is_off_and_names_the_caller_when_on(monkeypatch):
    """Gemini's backward calls DistributedLogger.debug once per micro-batch; colossalai's builds the message's
    prefix from inspect.stack() even when DEBUG is off (tests/training/test_colossalai_workarounds.py)."""
    import colossalai.logging.logger as colossalai_logger
    from colossalai.logging import get_dist_logger

    stack_calls = []
    monkeypatch.setattr(colossalai_logger.inspect, "stack", lambda *a: stack_calls.append(a) or [])
    logger = get_dist_logger("gemini-fixes-test")
    records = Records()
    logger._logger.addHandler(records)
    try:
        logger.set_level("INFO")
        gemini_fixes.debug_only_when_enabled(logger, "not logged")
        assert records.messages == [] and stack_calls == []
        logger.set_level("DEBUG")
        gemini_fixes.debug_only_when_enabled(logger, "comp cuda demand time: 0")
        line = test_debug_logging_costs_nothing_while_debug_is_off_and_names_the_caller_when_on.__code__.co_firstlineno
        prefix, message = records.messages
        path, rest = prefix.rsplit(":", 1)
        assert path == __file__ and rest.endswith(" test_debug_logging_costs_nothing_while_debug_is_off_and_names_"
                                                  "the_caller_when_on") and int(rest.split()[0]) > line
        assert message == "comp cuda demand time: 0" and stack_calls == []
    finally:
        logger.set_level("INFO")
        logger._logger.removeHandler(records)
