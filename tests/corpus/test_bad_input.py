"""Bad input: named by file and line, skipped and counted or a clear error; finished shards are never lost."""
import logging

import numpy as np
import pytest
from corpus_fakes import ByteTokenizer, docs, write_jsonl, write_parquet

from corpus.errors import DataError
from corpus.prepare import prepare_dataset
from corpus.shards import read_index


def prep(path, tok, cache, **kw):
    kw.setdefault("shard_tokens", 300)
    return prepare_dataset(str(path), tok, cache, workers=1, progress=False, **kw)


def good_file_then(tmp_path, name: str, content: bytes):
    """raw/a.jsonl: 20 good documents (several shards); raw/<name>: the bad one, read after it."""
    write_jsonl(tmp_path / "raw" / "a.jsonl", [{"text": t} for t in docs(5, 20)])
    (tmp_path / "raw" / name).write_bytes(content)
    return tmp_path / "raw"


def kept_docs(cache) -> int:
    folder, = cache.iterdir()
    index = read_index(folder)
    assert not index["complete"]
    return sum(e["docs"] for e in index["slices"].values())


def test_malformed_line_is_named_skipped_and_counted(tmp_path, tok, caplog):
    lines = [b'{"text": "one"}', b'{"text": "two"', b"", b'{"text": "three"}', b"[1, 2]", b'{"text": "four"}']
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "b.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING):
        ds = prep(tmp_path / "raw", tok, tmp_path / "cache")
    index = read_index(ds.folders[0])
    assert index["counts"]["bad_lines"] == 2 and index["counts"]["docs"] == 3
    assert any("b.jsonl:2: malformed JSON" in m for m in index["bad_line_examples"])
    assert any("b.jsonl:5: expected a JSON object" in m for m in index["bad_line_examples"])
    assert "b.jsonl:2" in caplog.text


def test_malformed_line_stops_the_run_by_flag_and_keeps_finished_shards(tmp_path, tok):
    raw = good_file_then(tmp_path, "b.jsonl", b'{"text": "fine"}\n{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"b\.jsonl:3: malformed JSON.*--on_bad_line skip"):
        prep(raw, tok, tmp_path / "cache", on_bad_line="error")
    assert kept_docs(tmp_path / "cache") >= 20  # a.jsonl and b.jsonl's first lines are kept
    (raw / "b.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "fine"}\n{"text": "mended"}\n')
    ds = prep(raw, tok, tmp_path / "cache", on_bad_line="error")
    clean = prep(raw, tok, tmp_path / "clean", on_bad_line="error")
    a, b = ds.sources[0].open(), clean.sources[0].open()
    np.testing.assert_array_equal(a.read(0, a.num_tokens), b.read(0, b.num_tokens))


def test_empty_file_is_an_error(tmp_path, tok):
    raw = good_file_then(tmp_path, "b.jsonl", b"")
    with pytest.raises(DataError, match=r"b\.jsonl is empty"):
        prep(raw, tok, tmp_path / "cache")
    raw_blank = good_file_then(tmp_path / "x", "b.jsonl", b"\n\n  \n")
    with pytest.raises(DataError, match=r"b\.jsonl holds no records"):
        prep(raw_blank, tok, tmp_path / "cache_blank")
    assert kept_docs(tmp_path / "cache_blank") == 20


def test_record_without_text_names_file_and_line(tmp_path, tok):
    raw = good_file_then(tmp_path, "b.jsonl", b'{"text": "ok"}\n{"body": "no text here"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: record has no 'text' or 'content' field"):
        prep(raw, tok, tmp_path / "cache")
    assert kept_docs(tmp_path / "cache") == 21
    raw2 = good_file_then(tmp_path / "y", "b.jsonl", b'{"text": null}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:1: field 'text' is NoneType"):
        prep(raw2, tok, tmp_path / "cache2")


def test_corrupt_and_truncated_zst(tmp_path, tok):
    import zstandard

    raw = good_file_then(tmp_path, "b.jsonl.zst", b"\x28\xb5\x2f\xfd" + b"garbage" * 50)
    with pytest.raises(DataError, match=r"b\.jsonl\.zst: corrupt"):
        prep(raw, tok, tmp_path / "cache")
    assert kept_docs(tmp_path / "cache") == 20
    whole = zstandard.ZstdCompressor().compress(b"".join(b'{"text": "%d"}\n' % i for i in range(5000)))
    raw2 = good_file_then(tmp_path / "t", "b.jsonl.zst", whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"b\.jsonl\.zst: corrupt.*truncated"):
        prep(raw2, tok, tmp_path / "cache2")


def test_corrupt_parquet_and_missing_column(tmp_path, tok):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"a\.parquet: not a readable parquet file"):
        prep(tmp_path / "raw", tok, tmp_path / "cache")
    write_parquet(tmp_path / "raw2" / "a.parquet", {"code": ["x = 1"]})
    with pytest.raises(DataError, match=r"no 'text' or 'content' column"):
        prep(tmp_path / "raw2", tok, tmp_path / "cache2")


def test_token_id_beyond_the_vocabulary(tmp_path):
    write_jsonl(tmp_path / "raw" / "a.jsonl", [{"text": f"d{i}"} for i in range(20)])
    (tmp_path / "raw" / "b.jsonl").write_bytes(b'{"text": "short"}\n{"text": "a much longer document"}\n')
    broken = ByteTokenizer(bad_after=10)  # ids past the vocabulary from the 11th token of a document on
    with pytest.raises(DataError, match=r"b\.jsonl:2: the tokenizer .* produced id 266, beyond its vocabulary"):
        prep(tmp_path / "raw", broken, tmp_path / "cache", shard_tokens=20)
    assert kept_docs(tmp_path / "cache") == 20  # a.jsonl's shards are kept; b.jsonl's batch is not


def test_prepared_folder_with_another_tokenizer_is_refused(tmp_path, tok):
    write_jsonl(tmp_path / "raw.jsonl", [{"text": t} for t in docs(1, 5)])
    ds = prep(tmp_path / "raw.jsonl", tok, tmp_path / "cache")
    with pytest.raises(DataError, match="vocab_size is 259"):
        prep(ds.folders[0], ByteTokenizer(offset=10), tmp_path / "cache")
