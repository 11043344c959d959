"""-p hybrid_parallel on two GPUs, end to end through pretrain.py on the suite's sample corpus (issue 6).

Every run trains the tiny model for 20 steps from the same seed on the same batches: model/policy.py seeds the
lazily built weights per parameter, so every layout starts from the same model, and the tensor- and pipeline-
parallel ranks of a replica read the same rows. The one-GPU run (hybrid_parallel with tp = pp = 1) is the
reference; each two-GPU layout's losses must match it step by step within bf16 tolerance.

  . .whl/gpu-env.sh && python3 -m pytest -m gpu -s tests/training/test_hybrid_gpu.py
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from corpus.sample import build_sample

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

ROOT = Path(__file__).resolve().parents[2]
STEPS = 20
COMMON = ["-c", "tiny", "-p", "hybrid_parallel", "-x", "bf16", "-b", "4", "-l", "256", "--lr", "1e-3", "-s", "2",
          "--seed", "42", "--log_interval", "1", "--data_workers", "1"]
# Relative difference allowed per step: two bf16 rounding steps. The layouts sum in other orders (row-parallel
# reductions, pipeline micro-batches), and the differences grow a little as the runs train.
RTOL = 2 * torch.finfo(torch.bfloat16).eps
LAYOUTS = {
    "tp2": ["--tp", "2"],
    "pp2": ["--pp", "2", "--microbatch_size", "1"],
    "tp2_zero1": ["--tp", "2", "--zero", "1"],
    "pp2_interleaved": ["--pp", "2", "--pp_style", "interleaved", "--num_model_chunks", "2", "--microbatch_size", "1"],
    "tp2_sequence_parallel": ["--tp", "2", "--sequence_parallel", "split_gather"],
    "tp2_sequence_parallel_ring": ["--tp", "2", "--sequence_parallel", "ring"],
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The sample corpus and tokenizer, and one tokenized cache shared by every run of this file."""
    folder = tmp_path_factory.mktemp("hybrid")
    return folder, build_sample(folder / "sample", vocab_size=512, target_mb=0.3)


def pretrain(work, name: str, *flags, nproc: int) -> Path:
    """Run pretrain.py on `nproc` GPUs; returns the run's folder (ckpt/, tb/ unless flags name others)."""
    folder, sample = work
    run_dir = folder / name
    args = [*COMMON, "-d", str(sample.corpus_dir), "--tokenizer", str(sample.tokenizer_dir),
            "--data_cache", str(folder / "prepared"), "-o", str(run_dir / "ckpt"), "-t", str(run_dir / "tb"), *flags]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "4"}
    result = subprocess.run([*launcher, "pretrain.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return run_dir


def logged_losses(tb_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = {}
    for events in sorted(tb_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        losses.update({e.step: e.value for e in accumulator.Scalars("train/loss")})
    return losses


def assert_losses_match(name: str, actual: dict[int, float], expected: dict[int, float]) -> None:
    steps = sorted(actual)
    print(f"\n{name:>24}: " + " ".join(f"{actual[s]:.4f}" for s in steps))
    print(f"{'one GPU':>24}: " + " ".join(f"{expected[s]:.4f}" for s in steps))
    worst = max(abs(actual[s] - expected[s]) / abs(expected[s]) for s in steps)
    print(f"{'':>24}  largest relative difference {worst:.2e} (allowed {RTOL:.2e})")
    mismatched = [f"step {s}: {actual[s]:.4f} vs {expected[s]:.4f}" for s in steps
                  if abs(actual[s] - expected[s]) > RTOL * abs(expected[s])]
    assert not mismatched, f"{name} vs one GPU: " + "; ".join(mismatched)


_REFERENCES: dict[str, dict[int, float]] = {}


def one_gpu_losses(work, kernels: str = "torch") -> dict[int, float]:
    if kernels not in _REFERENCES:
        run_dir = pretrain(work, f"one-{kernels}", "--max_steps", str(STEPS), "--kernels", kernels, nproc=1)
        _REFERENCES[kernels] = logged_losses(run_dir / "tb")
        assert sorted(_REFERENCES[kernels]) == list(range(1, STEPS + 1))
        assert _REFERENCES[kernels][STEPS] < _REFERENCES[kernels][1], "the one-GPU run did not learn"
    return _REFERENCES[kernels]


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
    import transformers

    from model.config import LlamaConfig
    from model.hf_io import load_hf_state_dict
    from model.llama import LlamaForCausalLM
    from training.checkpoint import model_folder

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
    subprocess.run([sys.executable, "export_hf.py", str(saved_checkpoint), str(tmp_path / "hf"), "--dtype",
                    "float32"], cwd=ROOT, check=True, capture_output=True)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    folder = model_folder(saved_checkpoint)
    ours = LlamaForCausalLM(LlamaConfig.from_name(str(folder))).eval()
    ours.load_state_dict(load_hf_state_dict(folder))
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)
