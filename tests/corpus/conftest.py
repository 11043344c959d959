"""Shared fixtures for the corpus tests: a byte tokenizer and small prepared data sets, written per session."""
import pytest
from corpus_fakes import ByteTokenizer, slimpajama, starcoder

from corpus.prepare import prepare_dataset


@pytest.fixture(scope="session")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="session")
def raw_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    slimpajama(root / "SlimPajama-627B", chunks=3, per_file=40)
    starcoder(root / "starcoderdata", per_lang=40)
    return root


@pytest.fixture(scope="session")
def mixture(raw_dir, tok, tmp_path_factory):
    """SlimPajama : StarCoder = 7 : 3 by tokens, 10 sources in all (7 slices + 3 languages)."""
    spec = f"{raw_dir / 'SlimPajama-627B'}:0.7,{raw_dir / 'starcoderdata'}:0.3"
    return prepare_dataset(spec, tok, tmp_path_factory.mktemp("cache"), workers=1, progress=False,
                           shard_tokens=3000)


@pytest.fixture(scope="session")
def single(raw_dir, tok, tmp_path_factory):
    """One source without slices: StarCoder's python folder, small shards so windows cross them."""
    return prepare_dataset(str(raw_dir / "starcoderdata" / "python"), tok, tmp_path_factory.mktemp("cache1"),
                           workers=1, progress=False, shard_tokens=500)
