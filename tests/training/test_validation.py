"""Validation data held out by construction, its readers, and the best checkpoint kept beside the last K."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus.errors import DataError
from corpus.loader import HeldOutReader, PretrainLoader, held_out_start
from corpus.prepare import prepare_dataset
from corpus.sample import build_sample
from corpus.sft import SFTLoader
from corpus.tokenizer import load_tokenizer
from training.checkpoint import CheckpointManager, model_folder

SEQ, BATCH, HELD_OUT = 64, 4, 0.05


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The suite's own sample corpus, prepared with its tokenizer: (PreparedDataset, tokenizer)."""
    work = tmp_path_factory.mktemp("validation")
    built = build_sample(work / "sample", vocab_size=512, target_mb=0.3)
    tok = load_tokenizer(str(built.tokenizer_dir))
    return prepare_dataset(str(built.corpus_dir), tok, work / "prepared", workers=1, progress=False), tok


def record_reads(loader) -> list[list[tuple[int, int]]]:
    """Wrap each source stream's read(): the (start, length) of every read, per source."""
    reads = [[] for _ in loader._streams]
    for s, stream in enumerate(loader._streams):
        def read(start, n, _read=stream.read, _log=reads[s]):
            _log.append((int(start), int(n)))
            return _read(start, n)
        stream.read = read
    return reads


def test_validation_never_reads_a_training_sample(sample):
    prepared, _ = sample
    train = PretrainLoader(prepared, seq_len=SEQ, batch_size=BATCH, rank=0, world_size=1, seed=3, held_out=HELD_OUT)
    train_reads = record_reads(train)
    train_rows = set()
    for _ in range(2 * train.samples_per_epoch // BATCH + 1):  # past a whole epoch of every source
        train_rows |= {bytes(row.numpy()) for row in next(train)["input_ids"]}
    val_rows, val_reads = [], [[] for _ in train.sources]
    for rank in range(2):
        val = HeldOutReader(prepared, seq_len=SEQ, batch_size=BATCH, rank=rank, world_size=2, held_out=HELD_OUT)
        reads = record_reads(val)
        assert val.names == [s.name for s in train.sources]
        for s in range(len(val.names)):
            for batch in val.batches(s):
                keep = (batch["labels"] != -100).any(dim=1)  # padding rows repeat a sample, unlabelled
                val_rows += [bytes(row.numpy()) for row in batch["input_ids"][keep]]
            val_reads[s] += reads[s]
    assert val_rows and not train_rows & set(val_rows)  # no validation row is ever a training row
    for s, source in enumerate(train.sources):
        stream = source.open()
        cut = held_out_start(stream, HELD_OUT)
        assert 0 < cut < stream.num_tokens and cut in set(stream.doc_starts(0, stream.num_tokens).tolist())
        assert max(start + n for start, n in train_reads[s]) <= cut  # training tokens lie before the tail
        assert min(start for start, _ in val_reads[s]) >= cut  # validation tokens inside it
        assert cut <= stream.num_tokens * (1 - HELD_OUT)  # at least the fraction asked for is held out


def test_validation_is_fixed_and_shared_among_ranks_without_loss(sample):
    prepared, _ = sample

    def labelled_rows(rank, world_size, max_tokens=5 * SEQ):
        val = HeldOutReader(prepared, seq_len=SEQ, batch_size=BATCH, rank=rank, world_size=world_size,
                            held_out=HELD_OUT, max_tokens=max_tokens)
        batches = [list(val.batches(s)) for s in range(len(val.names))]
        rows = [bytes(r.numpy()) for per_source in batches for b in per_source
                for r, keep in zip(b["input_ids"], (b["labels"] != -100).any(dim=1)) if keep]
        return [len(b) for b in batches], rows, val.num_tokens()

    counts, one, tokens = labelled_rows(0, 1)
    assert tokens == {name: 5 * SEQ for name in tokens}
    assert labelled_rows(0, 1) == (counts, one, tokens)  # the same rows every time
    per_rank = [labelled_rows(r, 3) for r in range(3)]
    assert len({tuple(c) for c, _, _ in per_rank}) == 1  # as many batches on every rank: forwards stay in step
    assert sorted(sum((rows for _, rows, _ in per_rank), [])) == sorted(one)  # every row once, over the ranks


def test_resume_with_another_held_out_fraction_is_a_clear_error(sample):
    prepared, _ = sample
    before = PretrainLoader(prepared, seq_len=SEQ, batch_size=BATCH, rank=0, world_size=1, seed=3)
    next(before)
    state = json.loads(json.dumps(before.state_dict()))
    with pytest.raises(DataError, match="--eval_fraction"):
        PretrainLoader(prepared, seq_len=SEQ, batch_size=BATCH, rank=0, world_size=1, seed=3,
                       held_out=HELD_OUT).load_state_dict(state)
    del state["held_out"]  # a state saved before validation existed still loads
    PretrainLoader(prepared, seq_len=SEQ, batch_size=BATCH, rank=0, world_size=1, seed=3).load_state_dict(state)


def test_finetuning_examples_held_out_are_never_trained_on(tmp_path, sample):
    _, tok = sample
    path = tmp_path / "inst.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"number {i} here"}) + "\n"
                            for i in range(40)))
    loader = SFTLoader(path, tok, seq_len=128, batch_size=4, rank=0, world_size=1, seed=0, held_out=0.2)
    assert loader.stats["held_out"] == 8
    trained = set()
    for _ in range(3 * loader.samples_per_epoch):
        trained |= responses(next(loader), tok)
    held_out = set()
    for batch in loader.validation().batches():
        held_out |= responses(batch, tok)
    assert len(trained) == 32 and len(held_out) == 8 and not trained & held_out
    other_seed = SFTLoader(path, tok, seq_len=128, batch_size=4, rank=0, world_size=1, seed=1, held_out=0.2)
    assert {r for b in other_seed.validation().batches() for r in responses(b, tok)} == held_out


def responses(batch, tok) -> set[str]:
    out = set()
    for row in batch["labels"]:
        ids = row[row != -100].tolist()
        text = tok.decode([i for i in ids if i != tok.eos_id])
        out |= {part.strip() for part in text.split("number") if part.strip()}
    return out


class FakeBooster:
    """What CheckpointManager.save asks of a booster, writing small files."""

    def save_model(self, model, path, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "weights.txt").write_text("w")

    def save_optimizer(self, optimizer, path, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)


class FakeConfig:
    def save_hf(self, folder):
        (Path(folder) / "config.json").write_text("{}")


def test_best_checkpoint_is_kept_beside_the_last_k(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1),
                                                  lambda step: 1.0)
    for step, val_loss in [(1, 5.0), (2, 3.0), (3, 4.0), (4, None), (5, 3.5)]:
        manager.save(FakeBooster(), None, None, scheduler, {"step": step, "val_loss": val_loss}, {}, FakeConfig())
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000004", "step-00000005"]
    assert (tmp_path / "best").read_text() == "step-00000002"
    assert manager.resolve("best") == tmp_path / "step-00000002"
    assert model_folder(tmp_path / "best") == tmp_path / "step-00000002" / "model"
    manager.save(FakeBooster(), None, None, scheduler, {"step": 6, "val_loss": 2.0}, {}, FakeConfig())
    assert (tmp_path / "best").read_text() == "step-00000006"
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000005", "step-00000006"]
    assert np.isclose(json.loads((tmp_path / "step-00000006" / "state.json").read_text())["val_loss"], 2.0)
