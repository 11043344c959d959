"""Every layout the issue names is read from small files written here: slices, splits, formats."""
import json
from collections import Counter

import pytest
from corpus_fakes import SLIM_SETS, docs, redpajama, redpajama_sample, slimpajama, starcoder, text_folder, write_jsonl

from corpus.errors import DataError
from corpus.sources import BadLine, HubSource, Record, canonical_slice, json_records, open_source


def read_all(src):
    return [(f.rel, r) for f in src.files for r in src.read(f)]


def test_canonical_slice_names():
    assert canonical_slice("RedPajamaCommonCrawl") == canonical_slice("cc") == "common_crawl"
    assert canonical_slice("RedPajamaGithub") == canonical_slice("GitHub") == "github"
    assert canonical_slice("RedPajamaArXiv") == "arxiv"
    assert canonical_slice("python") == "python"


def test_redpajama_1t_layout_slices_by_folder(tmp_path):
    src = open_source(str(redpajama(tmp_path / "RedPajama-Data-1T", per_slice=5)))
    assert {f.slice for f in src.files} == {"arxiv", "book", "c4", "common_crawl", "github", "stackexchange",
                                             "wikipedia"}
    assert not any("urls" in f.rel for f in src.files)  # url lists are not text to train on
    cc = [f for f in src.files if f.slice == "common_crawl"]
    assert cc[0].compression == "zst" and cc[0].rel.startswith("common_crawl/2019-30/")
    records = read_all(src)
    assert len(records) == 35 and all(isinstance(r, Record) and r.text for _, r in records)


def test_redpajama_sample_slices_by_file_name(tmp_path):
    src = open_source(str(redpajama_sample(tmp_path / "RedPajama-Data-1T-Sample", per_file=3)))
    assert sorted(f.slice for f in src.files) == sorted(
        ["arxiv", "book", "c4", "common_crawl", "github", "stackexchange", "wikipedia"])


def test_slimpajama_reads_train_split_and_meta_set_names(tmp_path):
    root = slimpajama(tmp_path / "SlimPajama-627B", chunks=2, per_file=10)
    src = open_source(str(root))
    assert src.name == "SlimPajama-627B"
    assert all(f.rel.startswith("chunk") and f.rel.endswith(".jsonl.zst") for f in src.files)
    assert len(src.files) == 4  # train only: 2 chunks x 2 files
    slices = Counter(r.slice for _, r in read_all(src))
    assert set(slices) <= {canonical_slice(v) for v in SLIM_SETS.values()} and sum(slices.values()) == 40
    val = open_source(str(root / "validation"))
    assert val.name == "SlimPajama-627B" and len(val.files) == 2
    assert {r.text for _, r in read_all(val)}.isdisjoint({r.text for _, r in read_all(src)})


def test_starcoder_parquet_content_column_and_language_slices(tmp_path):
    src = open_source(str(starcoder(tmp_path / "starcoderdata", per_lang=5)))
    assert {f.slice for f in src.files} == {"python", "javascript", "c"}
    assert all(f.format == "parquet" for f in src.files)
    records = read_all(src)
    assert len(records) == 15 and records[0][1].text.startswith("# c file 0")
    # resume inside a parquet file skips exactly the rows before the position
    f = src.files[0]
    assert [r.pos for r in src.read(f, skip_to=3)] == [4, 5]


def test_text_folder_one_document_per_file(tmp_path):
    src = open_source(str(text_folder(tmp_path / "texts", n=6)))
    assert {f.slice for f in src.files} == {"part0", "part1"}
    assert len(read_all(src)) == 6


def test_single_jsonl_file_and_resume_position(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"text": t} for t in docs(1, 5)])
    src = open_source(str(path))
    assert src.name == "mine" and len(src.files) == 1
    f = src.files[0]
    assert [r.pos for r in src.read(f)] == [1, 2, 3, 4, 5]
    assert [r.pos for r in src.read(f, skip_to=2)] == [3, 4, 5]


def test_json_array_file_as_alpaca_ships_it(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}, 3]))
    got = list(json_records(path))
    assert got[0] == (1, {"instruction": "a", "output": "b"}) and isinstance(got[2][1], BadLine)


def test_hub_names_are_not_paths(tmp_path):
    src = open_source("cerebras/SlimPajama-627B")
    assert isinstance(src, HubSource) and src.name == "SlimPajama-627B"
    cfg = open_source("togethercomputer/RedPajama-Data-1T@arxiv")
    assert cfg.config == "arxiv" and cfg.files[0].slice == "arxiv"
    lang = open_source("bigcode/starcoderdata/python")
    assert lang.name == "starcoderdata" and lang.data_dir == "python" and lang.files[0].slice == "python"
    with pytest.raises(DataError, match="not found"):
        open_source(str(tmp_path / "missing" / "data"))


def test_folder_without_data_files_is_an_error(tmp_path):
    (tmp_path / "README.md").write_text("hello")
    with pytest.raises(DataError, match="no data files"):
        open_source(str(tmp_path))


def test_gzip_jsonl_and_a_corrupt_one(tmp_path):
    import gzip

    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n{"text": "y"}\n'))
    assert [r.text for _, r in read_all(open_source(str(tmp_path / "ok")))] == ["x", "y"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 1000)[:60])
    with pytest.raises(DataError, match=r"a\.jsonl\.gz: corrupt or truncated"):
        read_all(open_source(str(tmp_path / "bad")))


def test_metadata_and_prepared_folders_inside_the_data_are_not_data(tmp_path, tok):
    from corpus.prepare import prepare_dataset

    root = tmp_path / "data"
    write_jsonl(root / "a.jsonl", [{"text": t} for t in docs(2, 4)])
    (root / "dataset_info.json").write_text('{"description": "metadata"}')
    first = prepare_dataset(str(root), tok, root / "prepared", workers=1, progress=False)
    src = open_source(str(root))
    assert [f.rel for f in src.files] == ["a.jsonl"]
    assert first.num_tokens > 0
