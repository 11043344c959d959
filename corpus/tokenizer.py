"""One tokenizer interface for the suite, over SentencePiece models and Hugging Face tokenizers.

    tok = load_tokenizer("data/sample/tokenizer")   # or .../tokenizer.model, or "meta-llama/Llama-2-7b-hf"
    ids = tok.encode("def f(x):\n    return x")     # never adds bos/eos: packing decides where they go

A spec is a SentencePiece `tokenizer.model` file, a folder holding one (preferred: SentencePiece is the
reference for Llama-1/2 ids) or Hugging Face tokenizer files, or a hub name. Tokenizers pickle by value,
so data-loader workers need neither the original files nor the network.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from corpus.errors import DataError

SPM_FILE = "tokenizer.model"
HF_FILES = ("tokenizer.json", "tokenizer_config.json")


class Tokenizer:
    """What the rest of the suite may use. `source` is the spec the tokenizer was loaded from."""

    source: str
    vocab_size: int  # number of ids: max id + 1
    bos_id: int
    eos_id: int
    pad_id: int  # the tokenizer's own pad, else eos

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def save_pretrained(self, folder) -> None:
        """Write files that `transformers.AutoTokenizer.from_pretrained(folder)` loads to the same ids."""
        raise NotImplementedError

    def __repr__(self):
        return (f"{type(self).__name__}(source={self.source!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})")


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_proto: bytes, source: str):
        import sentencepiece as spm

        self._proto, self.source = model_proto, source
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise DataError(f"tokenizer {source!r}: the SentencePiece model has no bos or eos piece; "
                            "expected a Llama-style model with <s> and </s>")
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    def encode_batch(self, texts):
        return self._sp.encode(list(texts))

    def decode(self, ids):
        return self._sp.decode([int(i) for i in ids])

    def __getstate__(self):
        return {"model_proto": self._proto, "source": self.source}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["source"])

    def save_pretrained(self, folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # transformers 5 rebuilds a LlamaTokenizer's pipeline in Python with Metaspace(prepend_scheme="first"),
        # which adds no dummy prefix to text that already starts with a space, so its ids differ from
        # SentencePiece's there. A plain fast tokenizer loads tokenizer.json verbatim, and this one keeps the
        # normalizer of Llama-2's own tokenizer.json (always prepend "▁"), which SentencePiece agrees with.
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self._sp.id_to_piece(self.bos_id),
            "eos_token": self._sp.id_to_piece(self.eos_id),
            "unk_token": self._sp.id_to_piece(self._sp.unk_id()),
            "clean_up_tokenization_spaces": False,
        }
        if self._sp.pad_id() >= 0:
            config["pad_token"] = self._sp.id_to_piece(self._sp.pad_id())
        _write_atomic(folder / SPM_FILE, self._proto)
        _write_atomic(folder / "tokenizer.json", _spm_to_tokenizers(self._proto).to_str(pretty=True).encode())
        _write_atomic(folder / "tokenizer_config.json", json.dumps(config, indent=2).encode())


class HFTokenizer(Tokenizer):
    """A `tokenizers` backend (what AutoTokenizer wraps) with its special-token ids."""

    def __init__(self, backend, source: str, special: dict[str, str | None]):
        self._backend, self.source, self._special = backend, source, special
        # Text that happens to contain "</s>" stays text, as it does with SentencePiece.
        self._backend.encode_special_tokens = True
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        if special.get("eos_token") is None:
            raise DataError(f"tokenizer {source!r} has no eos token; expected a causal-LM tokenizer")
        self.eos_id = vocab[special["eos_token"]]
        self.bos_id = vocab[special["bos_token"]] if special.get("bos_token") else self.eos_id
        self.pad_id = vocab[special["pad_token"]] if special.get("pad_token") else self.eos_id

    @classmethod
    def from_pretrained(cls, name_or_path: str, source: str) -> HFTokenizer:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(name_or_path)
        if getattr(hf, "backend_tokenizer", None) is None:
            raise DataError(f"tokenizer {source!r} has no `tokenizers` backend; expected a fast tokenizer")
        special = {k: getattr(hf, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        return cls(hf.backend_tokenizer, source, {k: None if v is None else str(v) for k, v in special.items()})

    def encode_batch(self, texts):
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids):
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def __getstate__(self):
        return {"json": self._backend.to_str(), "source": self.source, "special": self._special}

    def __setstate__(self, state):
        from tokenizers import Tokenizer as Backend

        self.__init__(Backend.from_str(state["json"]), state["source"], state["special"])

    def save_pretrained(self, folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        config.update({k: v for k, v in self._special.items() if v is not None})
        _write_atomic(folder / "tokenizer.json", self._backend.to_str(pretty=True).encode())
        _write_atomic(folder / "tokenizer_config.json", json.dumps(config, indent=2).encode())


def load_tokenizer(spec: str) -> Tokenizer:
    """A SentencePiece .model file, a folder with tokenizer.model or HF tokenizer files, or a hub name."""
    spec = os.fspath(spec)
    if not spec.strip():
        raise DataError("tokenizer spec is empty: expected a tokenizer.model, a tokenizer folder or a hub name")
    path = Path(spec).expanduser()
    try:
        if path.is_file() and path.suffix == ".json":  # tokenizer.json named directly: load its folder
            path = path.parent
        if path.is_dir() and (path / SPM_FILE).is_file():
            path = path / SPM_FILE
        if path.is_file():
            return SentencePieceTokenizer(path.read_bytes(), source=spec)
        if path.is_dir() and any((path / f).is_file() for f in HF_FILES):
            return HFTokenizer.from_pretrained(str(path), source=spec)
    except DataError:
        raise
    except Exception as e:  # sentencepiece and transformers raise many kinds of errors for a bad file
        raise DataError(f"tokenizer {spec!r} could not be read ({type(e).__name__}: {_first_line(e)}); "
                        f"expected a SentencePiece {SPM_FILE} or a Hugging Face tokenizer folder") from e
    expected = f"expected a SentencePiece {SPM_FILE}, a folder holding it or {' / '.join(HF_FILES)}, or a hub name"
    if path.is_dir():
        raise DataError(f"tokenizer {spec!r} is a folder without tokenizer files: {expected}")
    if path.exists() or _looks_local(spec):
        raise DataError(f"tokenizer {spec!r} not found: {expected}")
    try:
        return HFTokenizer.from_pretrained(spec, source=spec)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"tokenizer {spec!r} is not a local file or folder and could not be loaded from the "
                        f"Hugging Face hub ({type(e).__name__}: {_first_line(e)})") from e


def _looks_local(spec: str) -> bool:
    # Hub names are "name" or "org/name"; anything else is meant as a path.
    return (spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
            or spec.endswith((".model", ".json")))


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _spm_to_tokenizers(model_proto: bytes):
    """A `tokenizers` BPE equal to a Llama-style SentencePiece BPE model, laid out as Llama-2's tokenizer.json."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, normalizers, processors
    from tokenizers.models import BPE

    m = pb.ModelProto()
    m.ParseFromString(model_proto)
    norm = m.normalizer_spec
    if (m.trainer_spec.model_type != pb.TrainerSpec.BPE or not m.trainer_spec.byte_fallback
            or norm.name != "identity" or norm.remove_extra_whitespaces):
        raise DataError("save_pretrained converts only Llama-style SentencePiece models (BPE, byte_fallback, "
                        "identity normalization, whitespace kept); this one is not")
    P = pb.ModelProto.SentencePiece
    vocab = {p.piece: i for i, p in enumerate(m.pieces)}
    # SentencePiece merges the adjacent pair whose result scores highest; a BPE merge list ranked by
    # the result's score (its id, for a BPE model) does the same.
    merges = []
    for i, p in enumerate(m.pieces):
        if p.type != P.NORMAL:
            continue
        splits = [(p.piece[:k], p.piece[k:]) for k in range(1, len(p.piece))]
        merges += [(i, vocab[a], vocab[b], a, b) for a, b in splits if a in vocab and b in vocab]
    merges = [(a, b) for *_, a, b in sorted(merges)]

    unk = m.pieces[m.trainer_spec.unk_id].piece
    tok = Backend(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    specials = [p.piece for p in m.pieces if p.type in (P.CONTROL, P.UNKNOWN, P.USER_DEFINED)]
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    prefix = [normalizers.Prepend("▁")] if norm.add_dummy_prefix else []
    tok.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    bos = m.pieces[m.trainer_spec.bos_id].piece
    tok.post_processor = processors.TemplateProcessing(  # Llama adds bos, as AutoTokenizer users expect
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, m.trainer_spec.bos_id)])
    return tok


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
