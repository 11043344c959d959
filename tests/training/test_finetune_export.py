"""export_hf.py and finetune.py on the CPU, from a short pretraining run of the tiny model."""
import json
from pathlib import Path

import pytest
import transformers
from entry_points import assert_export_gives_suite_logits
from entry_points import run_script as run

from corpus.sample import build_sample


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny model pretrained for a few steps on the suite's own sample corpus: (checkpoint dir, sample)."""
    work = tmp_path_factory.mktemp("pretrained")
    sample = build_sample(work / "sample", vocab_size=512, target_mb=0.3)
    run("pretrain.py", "-c", "tiny", "-p", "ddp", "-b", "2", "-l", "64", "--max_steps", "4", "-d", sample.corpus_dir,
        "--tokenizer", sample.tokenizer_dir, "--data_cache", work / "prepared", "-o", work / "ckpt", "-t", work / "tb",
        "--data_workers", "1")
    return work / "ckpt", sample


def test_export_loads_in_transformers_with_the_suites_logits(pretrained, tmp_path):
    checkpoint, _ = pretrained
    assert_export_gives_suite_logits(checkpoint, tmp_path / "hf", seq_len=32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer("def main():\n    return 1", add_special_tokens=False)["input_ids"]


def test_export_of_a_missing_checkpoint_is_one_clear_line(tmp_path):
    result = run("export_hf.py", tmp_path / "nothing", tmp_path / "out", check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'nothing'}")


def instructions(path: Path, count: int = 64) -> Path:
    """A small, learnable instruction set: repeat a word a given number of times."""
    words = ["alpha", "beta", "gamma", "delta"]
    with path.open("w") as f:
        for i in range(count):
            word, times = words[i % 4], 1 + i % 3
            record = {"instruction": f"Repeat the word {word} {times} times.", "input": "",
                      "output": " ".join([word] * times)}
            f.write(json.dumps(record) + "\n")
    return path


@pytest.mark.slow
def test_finetune_from_a_suite_checkpoint_lowers_the_response_loss(pretrained, tmp_path):
    checkpoint, sample = pretrained
    result = run("finetune.py", "--model", checkpoint, "-d", instructions(tmp_path / "sft.jsonl"), "-p", "ddp",
                 "-b", "4", "-l", "64", "--lr", "3e-3", "--max_steps", "30", "-s", "3", "-o", tmp_path / "ckpt",
                 "-t", tmp_path / "tb")
    done = [line for line in result.stdout.splitlines() if line.startswith("done:")][-1]
    first, last = (float(x) for x in done.split("loss ")[1].split(" (")[0].split(" -> "))
    assert last < 0.5 * first, done
    assert (tmp_path / "ckpt" / "latest").is_file()
