"""The colossalai bugs the suite works around. When one of these tests fails, colossalai has fixed the bug:
remove the workaround named in the test."""
import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="the bug concerns machines without CUDA")
def test_cpu_accelerator_cannot_synchronize():
    """Workaround: training/checkpoint.py _cpu_synchronize_as_no_op (optimizer checkpoints load on a CPU)."""
    from colossalai.accelerator import CpuAccelerator

    with pytest.raises(RuntimeError, match="not supported for cpu accelerator"):
        CpuAccelerator().synchronize()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the limitation concerns machines without CUDA")
def test_hybrid_adam_needs_cuda_to_build_its_cpu_kernel():
    """Why training/plugins.py build_optimizer uses torch AdamW without CUDA."""
    from colossalai.nn.optimizer import HybridAdam

    with pytest.raises(AssertionError, match="No usable kernel found for CPUAdamLoader"):
        HybridAdam(torch.nn.Linear(2, 2).parameters())


def test_gemini_records_each_chunks_gradient_norm_with_a_host_synchronisation():
    """Why training/gemini_fixes.py replaces Chunk.set_l2_norm: colossalai's calls .item() once per chunk per
    micro-batch, which stalls the GPU in every backward (the module's docstring has the profile)."""
    from colossalai.zero.gemini.chunk import Chunk
    from gemini_chunks import counted_item_calls, gradient_chunk

    from training import gemini_fixes

    chunk = gradient_chunk(torch.ones(4, dtype=torch.bfloat16), gathered=True)
    own = gemini_fixes.colossalais_own(Chunk, "set_l2_norm")
    with counted_item_calls() as synchronised:
        own(chunk)
    assert len(synchronised) == 1 and chunk.l2_norm == 4.0


def test_distributed_logger_inspects_the_stack_for_a_debug_message_it_does_not_log(monkeypatch):
    """Why training/gemini_fixes.py replaces DistributedLogger.debug: colossalai's reads inspect.stack() (every frame's
    module and source line) before the level check, once per micro-batch in Gemini's backward (173 ms a call in a
    profile on an H100 host)."""
    import colossalai.logging.logger as colossalai_logger
    from colossalai.logging import DistributedLogger, get_dist_logger

    from training import gemini_fixes

    real_stack, stack_calls = colossalai_logger.inspect.stack, []
    monkeypatch.setattr(colossalai_logger.inspect, "stack", lambda *a: stack_calls.append(a) or real_stack(*a))
    logger = get_dist_logger("workarounds-test")
    logger.set_level("INFO")
    gemini_fixes.colossalais_own(DistributedLogger, "debug")(logger, "not logged at INFO")
    assert len(stack_calls) == 1


def _count_norm_ops(rank: int, world_size: int) -> None:
    from dispatched_ops import DispatchedOps

    from training import zero_fixes

    gradients = [torch.ones(8, dtype=torch.bfloat16) for _ in range(20)]
    group = torch.distributed.new_group([0])
    counts = {}
    for name, norm in (("theirs", zero_fixes.colossalais_own("_compute_grad_norm")),
                       ("ours", zero_fixes.grad_norm_in_one_pass)):
        with DispatchedOps() as ops:
            assert norm(None, group, gradients) == pytest.approx(160 ** 0.5)
        counts[name] = len(ops.calls)
    assert counts["theirs"] >= 3 * len(gradients) and counts["ours"] <= 10, counts


def test_low_level_zero_takes_the_gradient_norm_one_gradient_at_a_time():
    """Why training/zero_fixes.py replaces LowLevelZeroOptimizer._compute_grad_norm: colossalai's runs several
    kernels per gradient (a float64 copy, a norm, a power, an addition), about 800 launches per step for 1b."""
    from gloo_ranks import run_on_ranks

    run_on_ranks(_count_norm_ops, world_size=1)


def _master_weights_after_load(rank: int, world_size: int) -> None:
    from gloo_ranks import trained_low_level_zero

    model, optimizer = trained_low_level_zero(world_size)
    weight = model[0].weight
    master = optimizer.working_to_master_param[id(weight)]
    trained = master.clone()
    optimizer.update_master_params(model)  # what LowLevelZeroCheckpointIO calls after loading the model's weights
    assert torch.equal(master, weight.detach().float().flatten())  # the bf16 weights, widened
    assert not torch.equal(master, trained)  # the trained low bits are gone


def test_low_level_zero_rebuilds_master_weights_from_the_rounded_weights_on_load():
    """Why training/master_weights.py saves the float32 master weights beside each checkpoint: colossalai's checkpoint
    holds the bf16 model weights, and loading it sets every master weight to its bf16 weight, so a resumed run no
    longer steps the weights it stopped with (Gemini loses them in the same way, on the GPU in
    tests/training/test_resume_gpu.py)."""
    import inspect

    from colossalai.booster.plugin.low_level_zero_plugin import LowLevelZeroCheckpointIO
    from gloo_ranks import run_on_ranks

    assert "update_master_params" in inspect.getsource(LowLevelZeroCheckpointIO.load_sharded_model)
    run_on_ranks(_master_weights_after_load, world_size=1)
