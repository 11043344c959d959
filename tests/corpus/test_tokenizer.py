"""corpus.tokenizer: one interface over SentencePiece and Hugging Face tokenizers, with HF export."""
import pickle
import shutil

import pytest

from corpus.sample import build_sample
from corpus.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

CODE = 'class A:\n    def f(self, x):\n\t\treturn  x + 12345  # tabs, two spaces\n\n\n        pass\n'
TEXTS = [
    "Hello world, this is plain ASCII text.",
    CODE,
    " one leading space",
    "   three leading spaces and trailing   ",
    "line one\nline two\r\nline three\n",
    "digits 3.14159 and 2024-01-01",
    "unicode: naïve café, 漢字, emoji 🙂",
    "",
]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return build_sample(tmp_path_factory.mktemp("sample"), vocab_size=512, target_mb=0.3)


@pytest.fixture(scope="module")
def tok(sample):
    return load_tokenizer(str(sample.tokenizer_model))


@pytest.fixture(scope="module")
def hf_only_dir(sample, tmp_path_factory):
    """A folder with Hugging Face files only, so load_tokenizer takes the `tokenizers` path."""
    folder = tmp_path_factory.mktemp("hf_only")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(sample.tokenizer_dir / name, folder / name)
    return folder


@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_ids_and_no_special_tokens_added(tok):
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (512, 1, 2)
    assert tok.pad_id == tok.eos_id  # Llama-style model without a pad piece
    ids = tok.encode("hello")
    assert ids and tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == "hello"


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_model_file_and_folder_give_same_ids(tok, sample):
    by_folder = load_tokenizer(str(sample.tokenizer_dir))
    assert by_folder.source == str(sample.tokenizer_dir)
    assert by_folder.encode_batch(TEXTS) == tok.encode_batch(TEXTS)


def test_hf_folder_gives_same_ids(tok, hf_only_dir):
    hf = load_tokenizer(str(hf_only_dir))
    assert isinstance(hf, HFTokenizer)
    assert (hf.vocab_size, hf.bos_id, hf.eos_id, hf.pad_id) == (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id)
    assert hf.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    assert [hf.decode(ids) for ids in hf.encode_batch(TEXTS)] == TEXTS
    by_file = load_tokenizer(str(hf_only_dir / "tokenizer.json"))
    assert by_file.source == str(hf_only_dir / "tokenizer.json") and by_file.encode(CODE) == tok.encode(CODE)


def test_special_token_text_in_a_document_stays_text(tok, hf_only_dir):
    text = "a literal </s> and <s> in a document"
    ids = tok.encode(text)
    assert tok.eos_id not in ids and tok.bos_id not in ids
    assert load_tokenizer(str(hf_only_dir)).encode(text) == ids


def test_save_pretrained_loads_in_transformers_with_same_ids(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)
    for text in TEXTS:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf.encode(text) == [tok.bos_id, *ids]  # Llama's default: bos, no eos
        assert hf.decode(ids) == text


def test_hf_tokenizer_save_pretrained_round_trips(hf_only_dir, tmp_path):
    from transformers import AutoTokenizer

    hf = load_tokenizer(str(hf_only_dir))
    hf.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert [again.encode(t, add_special_tokens=False) for t in TEXTS] == hf.encode_batch(TEXTS)


def test_pickles_by_value(sample, hf_only_dir, tmp_path):
    copy_dir = tmp_path / "tok"
    shutil.copytree(sample.tokenizer_dir, copy_dir)
    for tok in (load_tokenizer(str(copy_dir / "tokenizer.model")), load_tokenizer(str(hf_only_dir))):
        blob = pickle.dumps(tok)
        shutil.rmtree(copy_dir, ignore_errors=True)  # workers need no files
        again = pickle.loads(blob)
        assert type(again) is type(tok) and again.source == tok.source
        assert again.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
        assert (again.vocab_size, again.bos_id, again.eos_id, again.pad_id) == (
            tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id)


def test_bad_specs_name_the_spec(tmp_path):
    garbage = tmp_path / "tokenizer.model"
    garbage.write_bytes(b"not a sentencepiece model")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    bad_json_dir = tmp_path / "bad_json"
    bad_json_dir.mkdir()
    (bad_json_dir / "tokenizer.json").write_text("{not json")
    for spec in (str(tmp_path / "missing.model"), str(tmp_path / "missing_dir"), str(empty_dir), str(garbage),
                 str(bad_json_dir)):
        with pytest.raises(ValueError, match="expected") as err:
            load_tokenizer(spec)
        message = str(err.value)
        assert spec in message and "\n" not in message
    with pytest.raises(ValueError, match="empty"):
        load_tokenizer("")
