"""benchmark.py on the CPU: the HF baseline (its loss convention, its JSON lines, its refusals), --profile, and the
micro-batch search (its doubling and stopping, with a fake launcher and one real one)."""
import argparse
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from entry_points import run_script

from benchmark import CLOCK_FIELDS
from model.config import CONFIGS
from model.llama import LlamaForCausalLM
from tests.training.test_crash_resume import start
from tests.training.test_pretrain_cpu import last_error_line, ok
from training import batch_search
from training.baseline import build_hf_model

BENCH = ["-c", "tiny", "-p", "ddp", "-x", "fp32", "-l", "64", "--max_steps", "3"]
RUN_FIELDS = {"model_impl", "kernels", "attention", "plugin", "micro_batch", "tokens_per_s_per_gpu", "peak_mem_gib"}


def run(*command: str) -> subprocess.CompletedProcess:
    return run_script(*command, check=False, timeout=300)


def json_lines(result: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_hf_baseline_loss_equals_suite_loss_on_shifted_labels():
    """Same weights, same shifted labels (some ignored): the wrapper's loss is the suite's, and HF's own."""
    config = CONFIGS["tiny"]
    torch.manual_seed(0)
    suite = LlamaForCausalLM(config).eval()
    hf = build_hf_model(argparse.Namespace(grad_checkpoint=False, compile=False), config).eval()
    hf.hf.load_state_dict(suite.state_dict(), strict=True)  # the suite's names are HF's
    ids = torch.randint(0, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    shifted = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    shifted[0, :5] = -100  # a prompt that is not trained on
    with torch.no_grad():
        loss = hf(ids, labels=shifted)
        torch.testing.assert_close(loss, suite(ids, labels=shifted), atol=1e-5, rtol=1e-5)
        unshifted = ids.clone()
        unshifted[0, 1:6] = -100  # HF shifts its labels itself: the same targets, one place later
        torch.testing.assert_close(loss, hf.hf(ids, labels=unshifted).loss, atol=1e-5, rtol=1e-5)


def test_profile_writes_a_trace_and_prints_the_top_operators(tmp_path):
    result = ok(run("benchmark.py", *BENCH[:-1], "6", "-b", "2", "--profile", str(tmp_path / "profile")))
    trace = json.loads((tmp_path / "profile" / "trace-rank0.json").read_text())
    assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])  # the layers' matmuls
    assert "profile of steps 4-6" in result.stdout and "Self CPU time total" in result.stdout
    (line,) = json_lines(result)
    assert {key: line[key] for key in CLOCK_FIELDS} == dict.fromkeys(CLOCK_FIELDS)  # no GPU to read on a CPU
    assert line["energy_mj_per_token"] is None
    assert (line["kernels"], line["attention"]) == ("torch", "sdpa")  # the default preset's attention


def test_profile_refuses_too_few_steps():
    result = run("benchmark.py", *BENCH, "-b", "2", "--profile", "unused")
    assert result.returncode != 0
    assert last_error_line(result) == ("error: --profile needs --max_steps 6 or more (it skips 3 steps, then "
                                       "profiles 3), not 3")


@pytest.mark.slow
def test_baseline_hf_prints_both_runs_and_their_ratios():
    lines = json_lines(ok(run("benchmark.py", *BENCH, "-b", "2", "--baseline", "hf")))
    assert len(lines) == 3, lines
    suite, hf, ratios = lines
    assert RUN_FIELDS <= suite.keys() and RUN_FIELDS <= hf.keys()
    assert (suite["model_impl"], hf["model_impl"], hf["kernels"], hf["attention"]) == ("suite", "hf", "sdpa", "sdpa")
    assert suite["micro_batch"] == hf["micro_batch"] == 2 and suite["plugin"] == hf["plugin"] == "ddp"
    assert suite["tokens_per_s_per_gpu"] > 0 and hf["tokens_per_s_per_gpu"] > 0
    assert ratios["baseline"] == "hf"
    assert ratios["speedup"] == pytest.approx(suite["tokens_per_s_per_gpu"] / hf["tokens_per_s_per_gpu"], rel=0.01)
    assert "memory_ratio" in ratios and ratios["memory_ratio"] is None  # no GPU memory to compare on a CPU
    assert "energy_ratio" in ratios and ratios["energy_ratio"] is None  # nor an energy counter


def test_speedup_line_takes_medians_and_puts_energy_per_token_hf_over_suite():
    from benchmark import speedup_line

    def run(tokens_per_s, energy, peak):
        return {"tokens_per_s_per_gpu": tokens_per_s, "energy_mj_per_token": energy, "peak_mem_gib": peak}

    suite = [run(80.0, 9.0, 20.0), run(78.0, 9.2, 21.0), run(76.0, 9.4, 20.5)]
    hf = [run(50.0, 14.0, 30.0), run(49.0, 14.5, 30.0), run(48.0, 15.0, 28.0)]
    assert speedup_line(suite, hf) == {
        "baseline": "hf", "speedup": round(78.0 / 49.0, 3), "speedups": [1.6, round(78 / 49, 3), round(76 / 48, 3)],
        "energy_ratio": round(14.5 / 9.2, 3), "memory_ratio": round(21.0 / 30.0, 3)}
    # a board without an energy counter: the ratio is not made up
    no_energy = [dict(line, energy_mj_per_token=None) for line in suite]
    assert speedup_line(no_energy, hf)["energy_ratio"] is None


@pytest.mark.slow
def test_repeated_baseline_pairs_alternate_and_the_speedup_is_of_the_medians():
    lines = json_lines(ok(run("benchmark.py", *BENCH, "-b", "2", "--baseline", "hf", "--repeats", "3")))
    runs, ratios = lines[:-1], lines[-1]
    # suite first, then transformers' model first, then the suite again: a warming GPU favours neither
    assert [(line["model_impl"], line["repeat"]) for line in runs] == [
        ("suite", 1), ("hf", 1), ("hf", 2), ("suite", 2), ("suite", 3), ("hf", 3)]
    speed = {impl: [line["tokens_per_s_per_gpu"] for line in runs if line["model_impl"] == impl]
             for impl in ("suite", "hf")}
    assert ratios["baseline"] == "hf"
    assert ratios["speedup"] == pytest.approx(sorted(speed["suite"])[1] / sorted(speed["hf"])[1], rel=0.01)
    assert ratios["speedups"] == pytest.approx([s / h for s, h in zip(speed["suite"], speed["hf"])], rel=0.01)


def test_repeats_take_a_count_of_one_or_more(capsys):
    import benchmark

    with pytest.raises(SystemExit):
        benchmark.parser().parse_args(["--repeats", "0"])
    assert "argument --repeats: must be 1 or more, not 0" in capsys.readouterr().err


def test_repeats_with_profile_is_one_clear_line(tmp_path):
    line = last_error_line(run("benchmark.py", *BENCH[:-2], "--max_steps", "6", "--repeats", "2",
                               "--profile", str(tmp_path)))
    assert line == "error: --profile traces one run; leave out --repeats"


def test_sigterm_stops_without_a_checkpoint_a_line_or_the_baseline(tmp_path):
    """A benchmark told to stop (a scheduler's SIGTERM, a timeout) stops: it used to save the synthetic run's model
    and optimizer into -o (13 GB for 1b) and then go on to the HF baseline, printing a line of 0 tokens/s."""
    bench = start([sys.executable, "benchmark.py", *BENCH[:-1], "100000", "-b", "2", "--baseline", "hf",
                   "-o", tmp_path / "ckpt", "--log_interval", "1"])
    for line in bench.stdout:  # the loop is running once it logs a step
        if "loss=" in line:
            break
    os.killpg(bench.pid, signal.SIGTERM)
    output, _ = bench.communicate(timeout=120)
    assert bench.returncode != 0
    assert "SIGTERM: stopping at step" in output and "(suite model): stopped without a result" in output, output
    assert "baseline:" not in output and not [line for line in output.splitlines() if line.startswith("{")]
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_baseline_hf_with_hybrid_parallel_is_one_clear_line():
    line = last_error_line(run("benchmark.py", *BENCH, "-p", "hybrid_parallel", "--baseline", "hf"))
    assert "--baseline hf" in line and "hybrid_parallel" in line


@pytest.mark.slow
def test_recomputing_some_layers_runs_and_reports_how_many():
    (line,) = json_lines(ok(run("benchmark.py", *BENCH, "-b", "2", "-g", "1")))
    assert line["grad_checkpoint"] == 1 and line["tokens_per_s_per_gpu"] > 0  # of tiny's 4 layers


@pytest.mark.parametrize("flags, expected", [
    (["-g", "9"], "error: -g 9: the model has 4 layers; -g alone recomputes all"),
    (["-g", "2", "--baseline", "hf"], "error: --baseline hf with -g 2: transformers' activation checkpointing "
                                      "recomputes every layer or none; use -g alone, or no -g"),
], ids=["more_than_the_model", "with_the_hf_baseline"])
def test_recomputed_layers_the_run_cannot_honour_are_one_clear_line(flags, expected):
    assert last_error_line(run("benchmark.py", *BENCH, *flags)) == expected


@pytest.mark.parametrize("value, expected", [("some", "expected a number of layers, not 'some'"),
                                             ("-1", "expected 0 or more layers, not -1")])
def test_the_recomputation_flag_takes_a_layer_count_or_nothing(value, expected, capsys):
    import benchmark

    assert benchmark.parser().parse_args(["-g"]).grad_checkpoint is True
    assert benchmark.parser().parse_args(["-g", "3", "-p", "zero2"]).grad_checkpoint == 3
    assert benchmark.parser().parse_args([]).grad_checkpoint is False
    with pytest.raises(SystemExit):
        benchmark.parser().parse_args(["-g", value])
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: argument -g/--grad_checkpoint: {expected}")


def completed(batch: int, tokens_per_s: float | None = None, stderr: str = "") -> subprocess.CompletedProcess:
    """What one benchmark launch returns: its JSON line, or (tokens_per_s None) a failure with `stderr`."""
    if tokens_per_s is None:
        return subprocess.CompletedProcess([], 1, stdout="model tiny: ...\n", stderr=stderr)
    line = json.dumps({"micro_batch": batch, "tokens_per_s_per_gpu": tokens_per_s})
    return subprocess.CompletedProcess([], 0, stdout=f"model tiny: ...\n{line}\n", stderr="")


def fake_launcher(tokens_per_s: dict, failure: str, launched: list):
    def launch(flags, nproc, batch):
        launched.append(batch)
        return completed(batch, tokens_per_s.get(batch), stderr=failure)

    return launch


def test_search_doubles_until_out_of_memory_and_picks_the_fastest(capsys):
    launched = []
    oom = "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    launch = fake_launcher({1: 100.0, 2: 300.0, 4: 250.0}, oom, launched)
    summary, clean = batch_search.search(["-c", "tiny"], 1, 64, run=launch)
    assert launched == [1, 2, 4, 8]
    assert summary == {"best_micro_batch": 2, "tokens_per_s_per_gpu": 300.0, "tried": [1, 2, 4, 8],
                       "stopped_by": "out of memory"}
    assert clean
    out, err = capsys.readouterr()
    assert len(json_lines(subprocess.CompletedProcess([], 0, out))) == 3 and "micro batch 8: out of memory" in err


def test_search_stops_at_max_batch():
    summary, clean = batch_search.search([], 1, 5, run=fake_launcher({1: 1.0, 2: 2.0, 4: 3.0, 8: 4.0}, "", []))
    assert (summary["best_micro_batch"], summary["tried"], summary["stopped_by"], clean) == (4, [1, 2, 4], "max_batch",
                                                                                             True)


def test_search_reports_another_failure_with_its_last_lines(capsys):
    launch = fake_launcher({1: 1.0}, "RuntimeError: something else broke", [])
    summary, clean = batch_search.search([], 1, 64, run=launch)
    assert (summary["best_micro_batch"], summary["tried"], summary["stopped_by"], clean) == (1, [1, 2], "error", False)
    assert "something else broke" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["-b", "4"], ["-b4"], ["--batch_size=4"], ["--bat", "4"]])
def test_search_refuses_a_batch_flag(flag):
    with pytest.raises(SystemExit, match="leave -b/--batch_size out"):
        batch_search.main(["--", *BENCH, *flag])


@pytest.mark.slow
def test_search_runs_the_benchmark():
    result = ok(run("-m", "training.batch_search", "--nproc_per_node", "1", "--max_batch", "2", "--", *BENCH))
    *runs, summary = json_lines(result)
    assert [line["micro_batch"] for line in runs] == [1, 2]
    assert summary["tried"] == [1, 2] and summary["stopped_by"] == "max_batch"
    assert summary["best_micro_batch"] in (1, 2)
