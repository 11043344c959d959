"""corpus.sample: the offline sample corpus is deterministic, well formed, idempotent and leaks no paths."""
import json
import sysconfig
from pathlib import Path

import pytest

from corpus.sample import build_sample, main, read_manifest
from corpus.tokenizer import load_tokenizer

SMALL = {"vocab_size": 512, "target_mb": 0.3}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return build_sample(tmp_path_factory.mktemp("sample"), **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout(sample):
    root = sample.manifest.parent
    assert sorted(_files(root)) == [
        "corpus/github_sample.jsonl", "corpus/wikipedia_sample.jsonl", "manifest.json",
        "tokenizer/tokenizer.json", "tokenizer/tokenizer.model", "tokenizer/tokenizer_config.json"]
    assert sample.tokenizer_model == sample.tokenizer_dir / "tokenizer.model"
    assert not sample.up_to_date


def test_two_builds_are_byte_identical(sample, tmp_path):
    again = build_sample(tmp_path, **SMALL)
    assert _files(again.manifest.parent) == _files(sample.manifest.parent)


def test_jsonl_records(sample):
    stdlib = sysconfig.get_paths()["stdlib"]
    total = 0
    for name, source in (("github", "github"), ("wikipedia", "wikipedia")):
        path = sample.corpus_dir / f"{name}_sample.jsonl"
        total += path.stat().st_size
        lines = path.read_text().splitlines()
        assert lines, path
        paths = []
        for line in lines:
            record = json.loads(line)
            assert set(record) == {"text", "meta"}
            assert isinstance(record["text"], str) and record["text"].strip()
            meta = record["meta"]
            assert meta["source"] == source
            assert not Path(meta["path"]).is_absolute() and ".." not in meta["path"]
            assert meta["path"].endswith(".py") and "/test/" not in f"/{meta['path']}"
            assert not any(stdlib in str(v) for v in meta.values())
            paths.append(meta["path"])
        assert paths == sorted(paths) and len(set(paths)) == len(paths)
    assert 0.8 * SMALL["target_mb"] * 1e6 <= total <= SMALL["target_mb"] * 1e6


def test_code_keeps_indentation_and_prose_is_docstrings(sample):
    code = json.loads((sample.corpus_dir / "github_sample.jsonl").read_text().splitlines()[0])["text"]
    assert "\n    " in code
    prose = json.loads((sample.corpus_dir / "wikipedia_sample.jsonl").read_text().splitlines()[0])
    assert prose["text"].startswith(prose["meta"]["title"] + "\n\n")


def test_seed_changes_the_selection(sample, tmp_path):
    other = build_sample(tmp_path, **SMALL, seed=1)
    assert _files(other.corpus_dir) != _files(sample.corpus_dir)


def test_rerun_writes_nothing(sample):
    root = sample.manifest.parent
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    again = build_sample(root, **SMALL)
    assert again.up_to_date
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_damaged_or_changed_build_is_redone(sample, tmp_path):
    build_sample(tmp_path, **SMALL)
    expected = _files(tmp_path)
    (tmp_path / "corpus" / "github_sample.jsonl").write_text('{"text": "half a fi')
    assert not build_sample(tmp_path, **SMALL).up_to_date
    assert _files(tmp_path) == expected
    bigger = build_sample(tmp_path, vocab_size=600, target_mb=0.3)
    assert not bigger.up_to_date and read_manifest(tmp_path)["stats"]["vocab_size"] == 600


def test_sample_tokenizer_is_llama_style(sample):
    tok = load_tokenizer(str(sample.tokenizer_dir))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (512, 1, 2, 2)
    assert tok._sp.id_to_piece([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert tok._sp.id_to_piece(3) == "<0x00>"  # byte fallback: no text is unknown
    assert all(len(tok._sp.id_to_piece(i)) == 1 for i in tok.encode("12345"))  # digits split


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        build_sample(tmp_path, vocab_size=100, target_mb=0.3)
    with pytest.raises(ValueError, match="target_mb"):
        build_sample(tmp_path, target_mb=0)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="cannot write the sample to"):
        build_sample(a_file / "out", **SMALL)


def test_cli(sample, capsys):
    root = sample.manifest.parent
    main(["--out", str(root), "--vocab_size", "512", "--target_mb", "0.3"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "up to date" in out[0] and "github" in out[0] and "vocab 512" in out[0]
    with pytest.raises(SystemExit, match="error: vocab_size=10 is too small"):
        main(["--out", str(root), "--vocab_size", "10"])
