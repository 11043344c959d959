"""pretrain.py under torchrun for the multi-GPU tests of tests/training: the tiny model on the suite's sample corpus,
the losses it logs to TensorBoard, and their step-by-step comparison within bf16 tolerance.

A test file makes one `sample_work` per module (a fixture) with the flags all its runs share, and imports the rest:

    @pytest.fixture(scope="module")
    def work(tmp_path_factory):
        return sample_work(tmp_path_factory.mktemp("hybrid"), "-p", "hybrid_parallel")
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import torch
from entry_points import ROOT

from corpus.sample import SamplePaths, build_sample

# Every run: the tiny model in bf16, the same seed and batches, a loss logged at every step.
TINY = ["-c", "tiny", "-x", "bf16", "-b", "4", "-l", "256", "--lr", "1e-3", "-s", "2", "--seed", "42",
        "--log_interval", "1", "--data_workers", "1"]
# Relative difference allowed per step: two bf16 rounding steps. Runs that should agree sum in other orders
# (kernels, row-parallel reductions, pipeline micro-batches), and the differences grow a little as they train.
RTOL = 2 * torch.finfo(torch.bfloat16).eps


@dataclasses.dataclass
class SampleRuns:
    """The sample corpus and tokenizer, one tokenized cache shared by every run of a test file, the flags all its
    runs share, and the reference runs' losses (by run name; each reference runs once)."""

    folder: Path
    sample: SamplePaths
    flags: tuple[str, ...]
    references: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)


def sample_work(folder: Path, *flags: str) -> SampleRuns:
    """The sample corpus built in `folder`, where the runs will go too; `flags` go to every run."""
    return SampleRuns(folder, build_sample(folder / "sample", vocab_size=512, target_mb=0.3), flags)


def pretrain(work: SampleRuns, name: str, *flags: str, nproc: int) -> Path:
    """Run pretrain.py on `nproc` GPUs; returns the run's folder (ckpt/, tb/ unless flags name others)."""
    run_dir = work.folder / name
    args = [*TINY, *work.flags, "-d", str(work.sample.corpus_dir), "--tokenizer", str(work.sample.tokenizer_dir),
            "--data_cache", str(work.folder / "prepared"), "-o", str(run_dir / "ckpt"), "-t", str(run_dir / "tb"),
            *flags]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "4"}
    result = subprocess.run([*launcher, "pretrain.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return run_dir


def logged_losses(tb_dir: Path) -> dict[int, float]:
    """{step: train/loss} from every TensorBoard event file under tb_dir (a resumed run adds files)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = {}
    for events in sorted(tb_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        losses.update({e.step: e.value for e in accumulator.Scalars("train/loss")})
    return losses


def reference_losses(work: SampleRuns, name: str, *flags: str, steps: int, nproc: int) -> dict[int, float]:
    """The losses of run `name` (flags include --max_steps `steps`), run the first time it is asked for: it must log
    every step and learn, or the runs compared with it prove nothing."""
    if name not in work.references:
        work.references[name] = logged_losses(pretrain(work, name, *flags, nproc=nproc) / "tb")
    losses = work.references[name]
    assert sorted(losses) == list(range(1, steps + 1)), f"the {name} run logged steps {sorted(losses)}"
    assert losses[steps] < losses[1], f"the {name} run did not learn: {losses}"
    return losses


def assert_losses_match(name: str, actual: dict[int, float], expected: dict[int, float],
                        reference: str = "one GPU") -> None:
    """Every step of `actual` within RTOL of `expected`, the `reference` run; prints both for the -s log."""
    steps = sorted(actual)
    print(f"\n{name:>24}: " + " ".join(f"{actual[s]:.4f}" for s in steps))
    print(f"{reference:>24}: " + " ".join(f"{expected[s]:.4f}" for s in steps))
    worst = max(abs(actual[s] - expected[s]) / abs(expected[s]) for s in steps)
    print(f"{'':>24}  largest relative difference {worst:.2e} (allowed {RTOL:.2e})")
    mismatched = [f"step {s}: {actual[s]:.4f} vs {expected[s]:.4f}" for s in steps
                  if abs(actual[s] - expected[s]) > RTOL * abs(expected[s])]
    assert not mismatched, f"{name} vs {reference}: " + "; ".join(mismatched)
