"""--compile (torch.compile of each decoder layer) trains like the eager model: the first 10 losses of the tiny
model through pretrain.py on one GPU agree within bf16 tolerance, for the plugins that allow it."""
import pytest
import torch
from gpu_runs import assert_losses_match, logged_losses, pretrain, sample_work

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS = 10


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return sample_work(tmp_path_factory.mktemp("compile"))


@pytest.mark.parametrize("kernels", ["torch", "auto"])
@pytest.mark.parametrize("plugin", ["zero2", "ddp"])
def test_compiled_layers_train_like_eager_ones(work, plugin, kernels):
    flags = ["-p", plugin, "-x", "bf16", "--max_steps", str(STEPS), "--kernels", kernels]
    eager = logged_losses(pretrain(work, f"eager-{plugin}-{kernels}", *flags, nproc=1) / "tb")
    compiled = logged_losses(pretrain(work, f"compiled-{plugin}-{kernels}", *flags, "--compile", nproc=1) / "tb")
    assert sorted(compiled) == list(range(1, STEPS + 1))
    assert_losses_match(f"{plugin} {kernels} compiled", compiled, eager)
