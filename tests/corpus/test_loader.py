"""The packed loader: batch format, document boundaries, coverage, ranks, mixtures and exact resume."""
import json

import numpy as np
import pytest
import torch

from corpus.errors import DataError
from corpus.loader import PretrainLoader
from corpus.order import permute, uniform

SEQ, BATCH = 32, 4


def make(prepared, **kw):
    args = dict(seq_len=SEQ, batch_size=BATCH, rank=0, world_size=1, seed=1234)
    args.update(kw)
    return PretrainLoader(prepared, **args)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def rows(batches, key="input_ids"):
    return torch.cat([b[key] for b in batches])


def global_rows(per_rank_batches):
    """Batches of all ranks step by step -> rows in global slot order (rank 0's block, rank 1's, ...)."""
    return torch.cat([torch.cat([b["input_ids"] for b in step]) for step in zip(*per_rank_batches)])


def test_permute_is_a_bijection():
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        out = permute(np.arange(n), n, key=99)
        assert sorted(out.tolist()) == list(range(n))
    assert not np.array_equal(permute(np.arange(1000), 1000, 1), permute(np.arange(1000), 1000, 2))
    u = uniform(np.arange(10000), 5)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.02


def test_batch_format(mixture, tok):
    batch = next(make(mixture))
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    for v in batch.values():
        assert v.dtype == torch.int64 and v.shape == (BATCH, SEQ) and v.device.type == "cpu"


def test_labels_never_cross_documents_and_no_bos_filling(mixture, tok):
    for batch in take(make(mixture), 30):
        ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
        starts = pos == 0
        # a new document (position 0 after the window start) always opens with BOS, and only there
        assert torch.equal(ids[:, 1:] == tok.bos_id, starts[:, 1:])
        # the label is the next token, except where that token opens another document
        crossing = starts[:, 1:]
        assert torch.all(labels[:, :-1][crossing] == -100)
        assert torch.equal(labels[:, :-1][~crossing], ids[:, 1:][~crossing])
        assert not torch.any(labels == tok.bos_id)
        # positions count up by one within a document
        assert torch.all((pos[:, 1:] == pos[:, :-1] + 1) | starts[:, 1:])
        # no padding, no filler: ids are real tokens everywhere
        assert not torch.any(ids == tok.pad_id)


def test_one_epoch_reads_every_window_once_then_reshuffles(single):
    source = single.sources[0]
    stream = source.open()
    n = (source.num_tokens - 1) // SEQ
    starts = set(stream.doc_starts(0, stream.num_tokens).tolist())
    windows = {}  # input bytes -> the label of the last position: the window's extra token, or -100
    for k in range(n):
        w = np.asarray(stream.read(k * SEQ, SEQ + 1), dtype=np.int64)
        windows[bytes(w[:-1])] = -100 if (k + 1) * SEQ in starts else int(w[-1])
    assert len(windows) == n
    loader = make(single, batch_size=1)
    epoch0 = take(loader, n)
    first = [bytes(b["input_ids"][0].numpy()) for b in epoch0]
    assert sorted(first) == sorted(windows)  # each sample once: nothing lost, nothing twice
    assert [int(b["labels"][0, -1]) for b in epoch0] == [windows[k] for k in first]
    assert loader.epoch == 1 and loader.samples_per_epoch == n
    second = [bytes(r.numpy()) for r in rows(take(loader, n))]
    assert sorted(second) == sorted(windows) and second != first  # a new epoch, a new order


def test_ranks_read_disjoint_samples_that_make_the_global_batch(mixture):
    ref = rows(take(make(mixture, batch_size=3 * BATCH), 10))
    per_rank = [take(make(mixture, rank=r, world_size=3), 10) for r in range(3)]
    assert torch.equal(global_rows(per_rank), ref)
    sets = [{bytes(r.numpy()) for r in rows(b)} for b in per_rank]
    assert not (sets[0] & sets[1]) and not (sets[1] & sets[2]) and not (sets[0] & sets[2])


@pytest.mark.parametrize("n, batch_size", [(40, BATCH), (64, 32)])
def test_exact_resume_bit_for_bit(mixture, n, batch_size):
    straight = take(make(mixture, batch_size=batch_size), n)
    first = make(mixture, batch_size=batch_size)
    half = take(first, n // 2)
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON values survive a checkpoint
    resumed = make(mixture, batch_size=batch_size)
    resumed.load_state_dict(state)
    rest = take(resumed, n - n // 2)
    for a, b in zip(straight, half + rest):
        for k in a:
            assert torch.equal(a[k], b[k])
    assert resumed.tokens_seen_per_source() == make_after(mixture, n, batch_size=batch_size).tokens_seen_per_source()
    if batch_size == 32:
        assert resumed.epoch >= 1  # the run wrapped into a new epoch of some source


def make_after(prepared, n, **kw):
    loader = make(prepared, **kw)
    take(loader, n)
    return loader


@pytest.mark.parametrize("new_world", [1, 4])
def test_two_ranks_resumed_on_another_number_of_ranks(mixture, new_world):
    global_batch, steps_before, steps_after = 8, 6, 9
    old = [make(mixture, batch_size=4, rank=r, world_size=2) for r in range(2)]
    before = [take(loader, steps_before) for loader in old]
    states = [json.loads(json.dumps(loader.state_dict())) for loader in old]
    assert states[0] == states[1]  # every rank holds the same state: saving rank 0's suffices
    new = [make(mixture, batch_size=global_batch // new_world, rank=r, world_size=new_world)
           for r in range(new_world)]
    for loader in new:
        loader.load_state_dict(states[0])
    after = [take(loader, steps_after) for loader in new]
    seen = torch.cat([global_rows(before), global_rows(after)])
    ref = rows(take(make(mixture, batch_size=global_batch), steps_before + steps_after))
    assert torch.equal(seen, ref)  # the same samples in the same order: none lost, none repeated
    # within the first epoch, no window is read twice
    first_epoch = min(s.num_tokens // SEQ for s in mixture.sources)
    keys = [bytes(r.numpy()) for r in seen[:first_epoch]]
    assert len(set(keys)) == len(keys)


def test_mixture_proportions_by_tokens(mixture):
    loader = make(mixture, seq_len=16, batch_size=64)
    take(loader, 60)
    seen = loader.tokens_seen_per_source()
    total = sum(seen.values())
    assert total == 60 * 64 * 16
    slim = sum(v for k, v in seen.items() if k.startswith("SlimPajama-627B/")) / total
    code = sum(v for k, v in seen.items() if k.startswith("starcoderdata/")) / total
    assert abs(slim - 0.7) < 0.03 and abs(code - 0.3) < 0.03
    for s in mixture.sources:  # each source by its weight
        assert abs(seen[s.name] / total - s.weight) < 0.03, s.name


def test_state_mismatch_is_a_clear_error(mixture, single):
    state = make_after(mixture, 2).state_dict()
    with pytest.raises(DataError, match="seed"):
        make(mixture, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len"):
        make(mixture, seq_len=16).load_state_dict(state)
    with pytest.raises(DataError, match="sources"):
        make(single).load_state_dict(state)


def test_bad_rank_and_too_little_data(single):
    with pytest.raises(ValueError, match="rank 2"):
        make(single, rank=2, world_size=2)
    with pytest.raises(DataError, match="fewer than one sample"):
        make(single, seq_len=10**7)
