"""Kernel presets under -p gemini and -p zero2 on two GPUs, end to end through pretrain.py on the sample corpus.

For each plugin, the tiny model trains 10 steps from the same seed on the same batches with --kernels reference (the
plain-PyTorch kernels, run once per plugin) and with each preset; every preset's losses must match the reference
run's step by step within bf16 tolerance. tests/model/test_plugins_gpu.py does the same on one GPU, in process; this
adds the data-parallel gradient reduction of two ranks and pretrain.py's own loop. A preset whose packages are not
installed is skipped; `auto` takes only installed backends. -p zero1, which reduces a step's gradients once instead
of after every micro-batch, trains like zero2 when steps accumulate micro-batches.

  . .whl/gpu-env.sh && python3 -m pytest -m gpu -s tests/training/test_presets_two_gpu.py
"""
import pytest
import torch
from gpu_runs import assert_losses_match, logged_losses, pretrain, reference_losses, sample_work

from model.kernels import PRESETS, auto_preset, missing_packages

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

STEPS = 10
PLUGINS = ["gemini", "zero2"]
CANDIDATES = ["torch", "liger", "auto"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The sample corpus and tokenizer, and one tokenized cache shared by every run of this file."""
    return sample_work(tmp_path_factory.mktemp("presets"))


def run_flags(plugin: str, kernels: str) -> list[str]:
    return ["-p", plugin, "--max_steps", str(STEPS), "--kernels", kernels]


@pytest.mark.parametrize("preset", CANDIDATES)
@pytest.mark.parametrize("plugin", PLUGINS)
def test_first_losses_match_reference_kernels(work, plugin, preset):
    names = auto_preset() if preset == "auto" else PRESETS[preset]
    missing = sorted({p for op, name in names.items() for p in missing_packages(op, name)})
    if missing:
        pytest.skip(f"--kernels {preset} needs {', '.join(missing)}, not installed")
    expected = reference_losses(work, f"{plugin}-reference", *run_flags(plugin, "reference"), steps=STEPS, nproc=2)
    run_dir = pretrain(work, f"{plugin}-{preset}", *run_flags(plugin, preset), nproc=2)
    assert_losses_match(f"{plugin} {preset}", logged_losses(run_dir / "tb"), expected,
                        reference=f"{plugin} reference")


def test_zero1_accumulating_in_place_trains_like_zero2(work):
    """-p zero1 keeps full gradients on each GPU and sums a step's micro-batches in place, reducing once per step;
    zero2 reduce-scatters after every micro-batch. With 4 micro-batches per step, the same losses."""
    flags = ["--max_steps", str(STEPS), "--kernels", "auto", "--global_batch_tokens", str(4 * 256 * 2 * 4)]
    expected = reference_losses(work, "zero2-accumulating", "-p", "zero2", *flags, steps=STEPS, nproc=2)
    run_dir = pretrain(work, "zero1-accumulating", "-p", "zero1", *flags, nproc=2)
    assert_losses_match("zero1 accumulating", logged_losses(run_dir / "tb"), expected, reference="zero2 accumulating")
