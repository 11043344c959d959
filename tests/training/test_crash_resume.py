"""Runs that die: killed while saving, or preempted with SIGTERM, resume from a whole checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from entry_points import ROOT

from corpus.sample import build_sample



@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return build_sample(tmp_path_factory.mktemp("sample"), vocab_size=512, target_mb=0.3)


def command(sample, work: Path, *extra) -> list[str]:
    return [sys.executable, "pretrain.py", "-c", "tiny", "-p", "ddp", "-b", "2", "-l", "64", "-d", sample.corpus_dir,
            "--tokenizer", sample.tokenizer_dir, "--data_cache", work / "prepared", "-o", work / "ckpt",
            "-t", work / "tb", "--data_workers", "1", "--keep_last", "2", *map(str, extra)]


def start(cmd) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def saved_step(ckpt: Path) -> int:
    latest = ckpt / (ckpt / "latest").read_text().strip()
    return json.loads((latest / "state.json").read_text())["step"]


@pytest.mark.slow
def test_killed_while_saving_resumes_from_the_previous_checkpoint(sample, tmp_path):
    ckpt = tmp_path / "ckpt"
    run = start(command(sample, tmp_path, "--max_steps", "400", "-i", "3"))
    deadline = time.time() + 300
    # wait for a complete checkpoint, then for the next save to be under way, and kill -9 in the middle of it
    while time.time() < deadline and not (ckpt / "latest").is_file():
        time.sleep(0.01)
    while time.time() < deadline and not list(ckpt.glob(".incomplete-*")):
        time.sleep(0.001)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    debris = list(ckpt.glob(".incomplete-*"))
    assert debris, "the kill did not land during a save; nothing was tested"
    whole = saved_step(ckpt)
    assert int(debris[0].name.split("-")[-1]) > whole  # the interrupted save is newer than what latest names

    output = finish(start(command(sample, tmp_path, "--max_steps", str(whole + 4), "-i", "3", "-f", "latest")))
    assert f"resumed from {ckpt / f'step-{whole:08d}'} at step {whole}" in output
    assert saved_step(ckpt) == whole + 4


@pytest.mark.slow
def test_sigterm_saves_and_exits_then_resumes(sample, tmp_path):
    ckpt = tmp_path / "ckpt"
    run = start(command(sample, tmp_path, "--max_steps", "400"))
    for line in run.stdout:  # the run has started training once it logs its model line
        if line.startswith("model tiny"):
            break
    time.sleep(3)
    os.killpg(run.pid, signal.SIGTERM)
    output = finish(run)
    assert "SIGTERM: saving at step" in output
    stopped = saved_step(ckpt)
    assert 0 < stopped < 400
    output = finish(start(command(sample, tmp_path, "--max_steps", str(stopped + 3), "-f", "latest")))
    assert saved_step(ckpt) == stopped + 3
