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
