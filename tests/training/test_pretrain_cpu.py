"""pretrain.py end to end on the CPU: ddp over gloo, several processes, exact resume, clear errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from entry_points import ROOT, saved_weights

from corpus.sample import build_sample

TINY = ["-c", "tiny", "-p", "ddp", "-b", "2", "-l", "64", "--lr", "1e-3", "-s", "2", "--log_interval", "1"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A small corpus and tokenizer built by the suite itself (shared by the tests of this file)."""
    return build_sample(tmp_path_factory.mktemp("sample"), vocab_size=512, target_mb=0.3)


def pretrain(sample, workdir: Path, *extra, nproc: int = 1, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    args = [*TINY, "-d", str(sample.corpus_dir), "--tokenizer", str(sample.tokenizer_dir),
            "--data_cache", str(workdir / "prepared"), "-o", str(workdir / "ckpt"), "-t", str(workdir / "tb"),
            "--data_workers", "1", *extra]
    if launcher == "torchrun":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:  # the colossalai console script beside this interpreter; it starts `torchrun` found on PATH
        launcher = [str(Path(sys.executable).parent / "colossalai"), "run", "--nproc_per_node", str(nproc),
                    "--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([*launcher, "pretrain.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def logged_losses(tb_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = {}
    for events in sorted(tb_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        losses.update({e.step: e.value for e in accumulator.Scalars("train/loss")})
    return [losses[step] for step in sorted(losses)]


@pytest.mark.slow
def test_two_processes_train_together_like_one_with_their_global_batch(sample, tmp_path):
    """2 ranks x batch 2 see the same global batches as 1 rank x batch 4: same losses, same weights."""
    ok(pretrain(sample, tmp_path / "two", "--max_steps", "6", nproc=2))
    ok(pretrain(sample, tmp_path / "one", "--max_steps", "6", "-b", "4"))
    assert_same_training(tmp_path / "two", tmp_path / "one")


@pytest.mark.slow
def test_two_processes_accumulating_train_like_one_without(sample, tmp_path):
    """2 ranks x 4 micro-batches of 1 against 1 rank x batch 8, one micro-batch: the same global batches. Under
    DDP the first three micro-batches run inside no_sync: the first makes the gradients, the next two sum their
    linear layers' weight gradients into them inside their GEMMs; the last adds through autograd and DDP reduces
    the sums once. Same losses, same weights."""
    global_batch = ["--max_steps", "6", "--global_batch_tokens", str(8 * 64)]
    ok(pretrain(sample, tmp_path / "two", *global_batch, "-b", "1", nproc=2))
    ok(pretrain(sample, tmp_path / "one", *global_batch, "-b", "8"))
    assert_same_training(tmp_path / "two", tmp_path / "one")


def assert_same_training(run: Path, reference: Path) -> None:
    """Two runs of the same global batches: their losses and final weights agree up to float rounding."""
    losses, reference_losses = logged_losses(run / "tb"), logged_losses(reference / "tb")
    assert len(losses) == len(reference_losses) == 6
    assert losses[-1] < losses[0]
    # the loss is the mean over the global batch, however it is split: equal up to float rounding
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-4, atol=1e-4)
    trained = saved_weights(run / "ckpt")
    for name, weight in saved_weights(reference / "ckpt").items():
        torch.testing.assert_close(trained[name], weight, rtol=1e-4, atol=2e-5)


@pytest.mark.slow
def test_colossalai_run_launches_pretraining(sample, tmp_path):
    result = ok(pretrain(sample, tmp_path, "--max_steps", "3", nproc=2, launcher="colossalai"))
    assert "2 process(es)" in result.stdout and "done: step 3/3" in result.stdout
    assert len(logged_losses(tmp_path / "tb")) == 3


@pytest.mark.slow
def test_resume_is_bit_exact(sample, tmp_path):
    """20 steps straight equal 10 steps, a checkpoint, a new launch resuming, and 10 more: bit for bit."""
    ok(pretrain(sample, tmp_path / "straight", "--max_steps", "20", nproc=2))
    ok(pretrain(sample, tmp_path / "split", "--max_steps", "20", "-i", "10", "--stop_after", "10", nproc=2))
    ok(pretrain(sample, tmp_path / "split", "--max_steps", "20", "-f", "latest", nproc=2))
    assert logged_losses(tmp_path / "split" / "tb") == logged_losses(tmp_path / "straight" / "tb")
    straight, split = saved_weights(tmp_path / "straight" / "ckpt"), saved_weights(tmp_path / "split" / "ckpt")
    assert straight.keys() == split.keys()
    for name in straight:
        assert torch.equal(straight[name], split[name]), name


def last_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines, result.stderr[-2000:]
    return lines[-1]


def test_unknown_config_is_one_clear_line(sample, tmp_path):
    line = last_error_line(pretrain(sample, tmp_path, "-c", "tinyy"))
    assert "-c tinyy" in line and "unknown model config" in line


def test_missing_corpus_is_one_clear_line(sample, tmp_path):
    line = last_error_line(pretrain(sample, tmp_path, "-d", str(tmp_path / "no-such-corpus")))
    assert "no-such-corpus" in line


def test_tokenizer_larger_than_vocab_is_one_clear_line(sample, tmp_path):
    line = last_error_line(pretrain(sample, tmp_path, "--max_steps", "1", "-c", str(small_vocab_config(tmp_path))))
    assert str(sample.tokenizer_dir) in line and "more than the model config" in line


def small_vocab_config(tmp_path: Path) -> Path:
    import dataclasses

    from model.config import CONFIGS

    folder = tmp_path / "small-vocab"
    dataclasses.replace(CONFIGS["tiny"], vocab_size=100).save_hf(folder)
    return folder
