"""Preprocessing into shards: contents, dtypes, cache keys, exclusion, worker processes, resume, the CLI."""
import json
import os

import numpy as np
import pytest
from corpus_fakes import (ByteTokenizer, CrashingTokenizer, docs, redpajama, slimpajama, starcoder, text_folder,
                          write_jsonl)

from corpus.errors import DataError
from corpus.prepare import main, prepare_dataset
from corpus.shards import PreparedDataset, read_index


def streams(prepared):
    """{source: (all tokens, document starts)} read back through the shard reader."""
    out = {}
    for s in prepared.sources:
        st = s.open()
        out[s.name] = (np.asarray(st.read(0, st.num_tokens)).copy(), st.doc_starts(0, st.num_tokens))
    return out


def test_shards_hold_bos_text_eos_per_document(tmp_path, tok):
    texts = docs(7, 25)
    write_jsonl(tmp_path / "raw" / "a.jsonl", [{"text": t} for t in texts])
    ds = prepare_dataset(str(tmp_path / "raw"), tok, tmp_path / "cache", workers=1, progress=False, shard_tokens=200)
    (name, (tokens, starts)), = streams(ds).items()
    assert name == "raw" and tokens.dtype == np.uint16
    index = read_index(ds.folders[0])
    assert index["complete"] and len(index["slices"][""]["shards"]) > 2  # several shards, read as one stream
    bounds = list(starts) + [len(tokens)]
    got = [tokens[a:b] for a, b in zip(bounds, bounds[1:])]
    assert [tok.decode(d[1:-1]) for d in got] == texts
    assert all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in got)
    assert index["counts"]["docs"] == 25 and index["counts"]["tokens"] == len(tokens)


def test_uint32_for_vocabularies_past_65536(tmp_path):
    big = ByteTokenizer(offset=70_000)
    write_jsonl(tmp_path / "raw.jsonl", [{"text": t} for t in docs(1, 5)])
    ds = prepare_dataset(str(tmp_path / "raw.jsonl"), big, tmp_path / "cache", workers=1, progress=False)
    tokens, _ = streams(ds)["raw"]
    assert tokens.dtype == np.uint32 and tokens.max() >= 70_000


def test_every_layout_prepares(tmp_path, tok):
    for make in (redpajama, slimpajama, starcoder, text_folder):
        root = make(tmp_path / make.__name__)
        ds = prepare_dataset(str(root), tok, tmp_path / "cache", workers=1, progress=False)
        assert ds.num_tokens > 0 and abs(sum(s.weight for s in ds.sources) - 1) < 1e-9


def test_idempotent_and_keyed_by_tokenizer_and_exclude(tmp_path, tok):
    root = slimpajama(tmp_path / "SlimPajama-627B", chunks=1, per_file=20)
    first = prepare_dataset(str(root), tok, tmp_path / "cache", workers=1, progress=False)
    index_file = first.folders[0] / "index.json"
    mtime = os.stat(index_file).st_mtime_ns
    again = prepare_dataset(str(root), tok, tmp_path / "cache", workers=1, progress=False)
    assert again.folders == first.folders and os.stat(index_file).st_mtime_ns == mtime  # nothing redone
    other = prepare_dataset(str(root), ByteTokenizer(offset=4), tmp_path / "cache", workers=1, progress=False)
    assert other.folders != first.folders  # a new tokenizer never reuses stale shards
    no_gh = prepare_dataset(str(root), tok, tmp_path / "cache", workers=1, progress=False, exclude=["github"])
    assert no_gh.folders != first.folders
    assert "SlimPajama-627B/github" in {s.name for s in first.sources}
    assert "SlimPajama-627B/github" not in {s.name for s in no_gh.sources}
    index = read_index(no_gh.folders[0])
    assert index["counts"]["excluded_docs"]["github"] > 0
    # a prepared folder is used as it is
    direct = prepare_dataset(str(first.folders[0]), tok, tmp_path / "elsewhere", workers=1, progress=False)
    assert direct.folders == first.folders and not (tmp_path / "elsewhere").exists()


def test_exclude_whole_folder_is_never_read_and_unknown_names_fail(tmp_path, tok):
    root = redpajama(tmp_path / "rp", per_slice=4)
    (root / "github" / "github_0.jsonl").write_text("not json at all\n")  # would be a bad line if read
    ds = prepare_dataset(str(root), tok, tmp_path / "cache", workers=1, progress=False, exclude=["GitHub"])
    index = read_index(ds.folders[0])
    assert index["counts"]["excluded_files"] == 1 and index["counts"]["bad_lines"] == 0
    with pytest.raises(DataError, match="--exclude githb: no such slice"):
        prepare_dataset(str(root), tok, tmp_path / "cache", workers=1, progress=False, exclude=["githb"])


def test_worker_processes_give_the_same_shards(tmp_path, tok):
    root = slimpajama(tmp_path / "slim", chunks=2, per_file=30)
    one = prepare_dataset(str(root), tok, tmp_path / "c1", workers=1, progress=False, shard_tokens=700)
    two = prepare_dataset(str(root), tok, tmp_path / "c2", workers=2, progress=False, shard_tokens=700)
    a, b = streams(one), streams(two)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k][0], b[k][0])
        np.testing.assert_array_equal(a[k][1], b[k][1])


def test_interrupted_prepare_continues_where_it_stopped(tmp_path, tok):
    root = slimpajama(tmp_path / "slim", chunks=3, per_file=30)
    straight = prepare_dataset(str(root), tok, tmp_path / "straight", workers=1, progress=False, shard_tokens=600)
    crash = CrashingTokenizer(crash_at=9)
    crash.source = tok.source  # the same tokenizer as far as the cache key is concerned
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_dataset(str(root), crash, tmp_path / "resumed", workers=1, progress=False, shard_tokens=600)
    folder, = (tmp_path / "resumed").iterdir()
    index = read_index(folder)
    assert not index["complete"] and index["counts"]["docs"] > 0  # finished shards were kept
    kept = {s["name"] for e in index["slices"].values() for s in e["shards"]}
    with pytest.raises(DataError, match="did not finish"):
        PreparedDataset.open(folder)
    resumed = prepare_dataset(str(root), tok, tmp_path / "resumed", workers=1, progress=False, shard_tokens=600)
    assert resumed.folders == [folder]
    index = read_index(folder)
    assert kept <= {s["name"] for e in index["slices"].values() for s in e["shards"]}
    a, b = streams(straight), streams(resumed)
    assert a.keys() == b.keys()
    for k in a:  # no document lost or read twice
        np.testing.assert_array_equal(a[k][0], b[k][0])
        np.testing.assert_array_equal(a[k][1], b[k][1])
    assert index["counts"]["docs"] == read_index(straight.folders[0])["counts"]["docs"]


def test_cli(tmp_path, capsys, monkeypatch):
    write_jsonl(tmp_path / "raw" / "a.jsonl", [{"text": t} for t in docs(3, 10)])
    monkeypatch.setattr("corpus.tokenizer.load_tokenizer", lambda spec: ByteTokenizer(), raising=False)
    main(["-d", str(tmp_path / "raw"), "--tokenizer", "bytes", "--out", str(tmp_path / "out"), "--workers", "1",
          "--no_progress"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sources"]["raw"]["docs"] == 10
    with pytest.raises(SystemExit, match="no such slice"):
        main(["-d", str(tmp_path / "raw"), "--tokenizer", "bytes", "--out", str(tmp_path / "out"),
              "--exclude", "nope", "--no_progress"])


def test_real_sentencepiece_tokenizer_through_worker_processes(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from corpus.tokenizer import load_tokenizer

    texts = docs(11, 200, 20, 60)
    (tmp_path / "train.txt").write_text("\n".join(texts))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, minloglevel=2)
    real = load_tokenizer(str(tmp_path / "sp.model"))
    write_jsonl(tmp_path / "raw" / "a.jsonl", [{"text": t} for t in texts[:60]])
    ds = prepare_dataset(str(tmp_path / "raw"), real, tmp_path / "cache", workers=2, progress=False,
                         shard_tokens=1000)
    tokens, starts = streams(ds)["raw"]
    assert len(starts) == 60
    first = tokens[starts[0]:starts[1]]
    assert first[0] == real.bos_id and first[-1] == real.eos_id and first[1:-1].tolist() == real.encode(texts[0])


def test_hub_name_streams_through_datasets_and_resumes(tmp_path, tok, monkeypatch):
    import datasets

    rows = [{"text": t, "meta": {"redpajama_set_name": "RedPajamaC4" if i % 3 else "RedPajamaBook"}}
            for i, t in enumerate(docs(21, 40))]
    calls = []

    def fake_load_dataset(name, config=None, data_dir=None, split=None, streaming=False):
        calls.append((name, config, data_dir, split, streaming))
        return datasets.IterableDataset.from_generator(lambda: iter(rows))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = prepare_dataset("someone/tiny-pajama", tok, tmp_path / "cache", workers=1, progress=False)
    assert calls == [("someone/tiny-pajama", None, None, "train", True)]
    assert {s.name for s in ds.sources} == {"tiny-pajama/book", "tiny-pajama/c4"}
    assert read_index(ds.folders[0])["counts"]["docs"] == 40
    # an interrupted stream resumes by skipping the rows already prepared
    crash = CrashingTokenizer(crash_at=3)
    crash.source = "other"
    with pytest.raises(RuntimeError):
        prepare_dataset("someone/tiny-pajama", crash, tmp_path / "c2", workers=1, progress=False, shard_tokens=300)
    other = ByteTokenizer()
    other.source = "other"
    resumed = prepare_dataset("someone/tiny-pajama", other, tmp_path / "c2", workers=1, progress=False,
                              shard_tokens=300)
    a, b = streams(ds), streams(resumed)
    for k in a:
        np.testing.assert_array_equal(a[k][0], b[k][0])
