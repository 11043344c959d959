"""Validation in pretrain.py and finetune.py, eval.py on suite and exported HF checkpoints, and the loss picture."""
import json

import pytest
from entry_points import run_script as run

from corpus.sample import build_sample
from training.plots import read_scalars

EVAL = ["--eval_fraction", "0.05", "--eval_tokens", "4096"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny model pretrained with validation every 10 steps: (work dir, sample, pretrain.py's stdout)."""
    work = tmp_path_factory.mktemp("eval")
    sample = build_sample(work / "sample", vocab_size=512, target_mb=0.3)
    result = run("pretrain.py", "-c", "tiny", "-p", "ddp", "-b", "4", "-l", "64", "--lr", "3e-3", "-s", "3",
                 "--max_steps", "30", "--eval_interval", "10", *EVAL, "--keep_last", "1", "-i", "10",
                 "-d", sample.corpus_dir, "--tokenizer", sample.tokenizer_dir, "--data_cache", work / "prepared",
                 "-o", work / "ckpt", "-t", work / "tb", "--data_workers", "1")
    return work, sample, result.stdout


def eval_json(*args) -> dict:
    return json.loads(run("eval.py", *args, "--json", "--data_cache", args[0].parent / "prepared",
                          "--max_new_tokens", "4").stdout)


@pytest.mark.slow
def test_pretraining_validates_keeps_the_best_and_draws_the_curves(pretrained):
    work, _, stdout = pretrained
    scalars = read_scalars(work / "tb")
    val = scalars["val/loss"]
    assert sorted(val) == [10, 20, 30] and val[30] < val[10]
    assert {"val/corpus/github/loss", "val/corpus/wikipedia/loss", "val/ppl"} <= set(scalars)
    best = (work / "ckpt" / "best").read_text().strip()
    assert best == "step-00000030" and (work / "ckpt" / best / "state.json").is_file()
    assert json.loads((work / "ckpt" / best / "state.json").read_text())["val_loss"] == pytest.approx(val[30])
    assert (work / "tb" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "step 30: validation loss" in stdout and "greedy continuations:" in stdout


@pytest.mark.slow
def test_eval_of_the_exported_hf_checkpoint_equals_eval_of_the_suite_checkpoint(pretrained):
    work, sample, _ = pretrained
    # a suite checkpoint: by default the run's own held-out data, as validation read it during training
    suite = eval_json(work / "ckpt", "--eval_tokens", "4096")
    assert suite["dataset"] == str(sample.corpus_dir) and suite["eval_fraction"] == 0.05
    assert suite["loss"] == pytest.approx(read_scalars(work / "tb")["val/loss"][30], abs=1e-5)
    run("export_hf.py", work / "ckpt", work / "hf", "--dtype", "float32")
    hf = eval_json(work / "hf", "-d", sample.corpus_dir, "-l", "64", *EVAL)
    assert hf["sources"].keys() == suite["sources"].keys()
    for name in suite["sources"]:
        assert hf["sources"][name]["tokens"] == suite["sources"][name]["tokens"]
        assert hf["sources"][name]["loss"] == pytest.approx(suite["sources"][name]["loss"], abs=1e-5)
    assert hf["loss"] == pytest.approx(suite["loss"], abs=1e-5)
    assert hf["continuations"] == suite["continuations"]
    table = run("eval.py", work / "ckpt", "--data_cache", work / "prepared", "--max_new_tokens", "4").stdout
    assert "corpus/github" in table and "greedy continuations:" in table


@pytest.mark.slow
def test_plot_on_demand_from_a_tensorboard_folder(pretrained, tmp_path):
    work, _, _ = pretrained
    run("eval.py", "--plot", work / "tb", "--out", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = run("eval.py", "--plot", tmp_path, check=False)
    assert empty.returncode != 0 and "train/loss" in empty.stderr.strip().splitlines()[-1]


def test_eval_of_an_hf_folder_needs_data(tmp_path):
    from model.config import CONFIGS

    CONFIGS["tiny"].save_hf(tmp_path / "hf")
    result = run("eval.py", tmp_path / "hf", check=False)
    assert result.returncode != 0 and "give the data to evaluate with -d" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_finetuning_validates_on_held_out_examples(pretrained, tmp_path):
    work, _, _ = pretrained
    with (tmp_path / "sft.jsonl").open("w") as f:
        for i in range(64):
            word, times = ["alpha", "beta", "gamma", "delta"][i % 4], 1 + i % 3
            f.write(json.dumps({"instruction": f"Repeat the word {word} {times} times.",
                                "output": " ".join([word] * times)}) + "\n")
    result = run("finetune.py", "--model", work / "ckpt", "-d", tmp_path / "sft.jsonl", "-p", "ddp", "-b", "4",
                 "-l", "64", "--lr", "3e-3", "--max_steps", "20", "-s", "3", "--eval_interval", "10",
                 "--eval_fraction", "0.1", "-o", tmp_path / "ckpt", "-t", tmp_path / "tb")
    val = read_scalars(tmp_path / "tb")["val/loss"]
    assert sorted(val) == [10, 20] and val[20] < val[10]
    assert (tmp_path / "ckpt" / "best").is_file() and (tmp_path / "tb" / "loss.png").is_file()
    assert "validation loss" in result.stdout
