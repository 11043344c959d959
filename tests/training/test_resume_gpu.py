"""A run stopped after a checkpoint and resumed continues exactly as if it had never stopped, under each plugin that
keeps float32 master weights apart from its bf16 working weights, on one GPU, through pretrain.py.

Eight steps straight against four steps, a checkpoint, a new launch with `-f latest`, and four more: the same
losses bit for bit, and the same saved weights. Each step accumulates two micro-batches, so the in-place gradient
sums run too. Attention is the plain math kernel here, because FlashAttention's and cuDNN's backwards add their
partial gradients in whatever order their blocks finish, so two runs of the same steps differ in the last bits
with or without a resume; every other kernel of `--kernels auto` is deterministic.

  . .whl/gpu-env.sh && python3 -m pytest -m gpu -s tests/training/test_resume_gpu.py
"""
import pytest
import torch
from entry_points import saved_weights
from gpu_runs import logged_losses, pretrain, sample_work

pytestmark = pytest.mark.gpu

STEPS = 8
DETERMINISTIC = ["--kernels", "auto", "--kernel_override", "attention=math",
                 "--global_batch_tokens", str(2 * 4 * 256)]  # two micro-batches of gpu_runs.TINY's 4 x 256
PLUGINS = {
    "zero2": ["-p", "zero2"],
    "zero2_cpu": ["-p", "zero2_cpu"],
    "gemini": ["-p", "gemini"],
    # sharded chunks on one GPU, as on several: colossalai saves their float32 weights cast to bf16
    "gemini_offloaded": ["-p", "gemini", "--offload_optim_frac", "1", "--offload_param_frac", "0.5"],
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return sample_work(tmp_path_factory.mktemp("resume"), *DETERMINISTIC)


@pytest.mark.parametrize("plugin", list(PLUGINS))
def test_resumed_run_continues_bit_for_bit(work, plugin):
    straight = pretrain(work, f"{plugin}-straight", "--max_steps", str(STEPS), *PLUGINS[plugin], nproc=1)
    half = str(STEPS // 2)
    pretrain(work, f"{plugin}-split", "--max_steps", str(STEPS), "-i", half, "--stop_after", half,
             *PLUGINS[plugin], nproc=1)
    split = pretrain(work, f"{plugin}-split", "--max_steps", str(STEPS), "-f", "latest", *PLUGINS[plugin], nproc=1)

    expected, resumed = logged_losses(straight / "tb"), logged_losses(split / "tb")
    print(f"\n{plugin:>18} straight: " + " ".join(f"{expected[s]:.6f}" for s in sorted(expected)))
    print(f"{plugin:>18}  resumed: " + " ".join(f"{resumed[s]:.6f}" for s in sorted(resumed)))
    assert sorted(expected) == list(range(1, STEPS + 1)) and expected[STEPS] < expected[1]
    assert resumed == expected
    weights, reference = saved_weights(split / "ckpt"), saved_weights(straight / "ckpt")
    assert weights.keys() == reference.keys()
    differing = [name for name in reference if not torch.equal(weights[name], reference[name])]
    assert not differing, f"{len(differing)} of {len(reference)} weights differ after the resume, e.g. {differing[:3]}"
