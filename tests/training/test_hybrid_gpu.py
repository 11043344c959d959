"""-p hybrid_parallel on two GPUs, end to end through pretrain.py on the suite's sample corpus (issue 6).

Every run trains the tiny model for 20 steps from the same seed on the same batches: model/policy.py seeds the
lazily built weights per parameter, so every layout starts from the same model, and the tensor- and pipeline-
parallel ranks of a replica read the same rows. The one-GPU run (hybrid_parallel with tp = pp = 1) is the
reference; each two-GPU layout's losses must match it step by step within bf16 tolerance.

  . .whl/gpu-env.sh && python3 -m pytest -m gpu -s tests/training/test_hybrid_gpu.py
"""
import pytest
import torch
from entry_points import assert_export_gives_suite_logits
from gpu_runs import assert_losses_match, logged_losses, pretrain, reference_losses, sample_work

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

STEPS = 20
LAYOUTS = {
    "tp2": ["--tp", "2"],
    "pp2": ["--pp", "2", "--microbatch_size", "1"],
    "tp2_zero1": ["--tp", "2", "--zero", "1"],
    "pp2_interleaved": ["--pp", "2", "--pp_style", "interleaved", "--num_model_chunks", "2", "--microbatch_size", "1"],
    "tp2_sequence_parallel": ["--tp", "2", "--sequence_parallel", "split_gather"],
    "tp2_sequence_parallel_ring": ["--tp", "2", "--sequence_parallel", "ring"],
    # -g 1: each stage recomputes its first layer only (config.py recomputed_layers), the others keep activations
    "pp2_partial_recompute": ["--pp", "2", "--microbatch_size", "1", "-g", "1"],
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The sample corpus and tokenizer, and one tokenized cache shared by every run of this file."""
    return sample_work(tmp_path_factory.mktemp("hybrid"), "-p", "hybrid_parallel")


def one_gpu_losses(work, kernels: str = "torch") -> dict[int, float]:
    return reference_losses(work, f"one-{kernels}", "--max_steps", str(STEPS), "--kernels", kernels, steps=STEPS,
                            nproc=1)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_first_losses_match_one_gpu(work, layout):
    expected = one_gpu_losses(work)
    run_dir = pretrain(work, layout, "--max_steps", str(STEPS), *LAYOUTS[layout], nproc=2)
    assert_losses_match(layout, logged_losses(run_dir / "tb"), expected)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_fused_kernels_under_tensor_and_pipeline_parallelism(work, layout):
    """Liger's kernels (RMSNorm, rotary, SwiGLU; its fused loss on the last stage under pp, the vocabulary-parallel
    loss under tp) against the one-GPU run with the same kernels."""
    from model.kernels import missing_packages

    missing = sorted({p for op in ("rms_norm", "rotary", "swiglu", "loss") for p in missing_packages(op, "liger")})
    if missing:
        pytest.skip(f"--kernels liger needs {', '.join(missing)}")
    expected = one_gpu_losses(work, "liger")
    run_dir = pretrain(work, f"{layout}-liger", "--max_steps", str(STEPS), "--kernels", "liger", *LAYOUTS[layout],
                       nproc=2)
    assert_losses_match(f"{layout} liger", logged_losses(run_dir / "tb"), expected)


@pytest.mark.parametrize("saved", ["tp2", "pp2"])
def test_checkpoint_saved_on_two_gpus_resumes_on_one_and_exports(work, saved, tmp_path):
    """Steps 1-10 under tp=2 (or pp=2), saved; steps 11-20 resumed from that checkpoint on one GPU (tp = pp = 1):
    the one-GPU run's losses. Then export_hf.py: transformers loads the export with the suite's logits."""
    expected = one_gpu_losses(work)
    half = str(STEPS // 2)
    first = pretrain(work, f"{saved}-first-half", "--max_steps", str(STEPS), "-i", half, "--stop_after", half,
                     *LAYOUTS[saved], nproc=2)
    checkpoints = first / "ckpt"
    second = pretrain(work, f"{saved}-second-half", "--max_steps", str(STEPS), "-o", str(checkpoints),
                      "-f", "latest", nproc=1)
    losses = {**logged_losses(first / "tb"), **logged_losses(second / "tb")}
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert_losses_match(f"{saved} -> one GPU", losses, expected)

    saved_checkpoint = checkpoints / f"step-{STEPS // 2:08d}"  # the one written by the two-GPU layout
    assert_export_gives_suite_logits(saved_checkpoint, tmp_path / "hf", seq_len=64)
