"""Binary token shards and their index: the on-disk format that `prepare` writes and the loaders read.

A prepared folder holds, per slice (arxiv, github, ... or "" for data without slices):

    index.json                      what is complete; written last, atomically
    shards/<slice>/00000.bin        token ids, uint16 (vocabulary <= 65,536 ids) else uint32; each document
                                    stored as BOS text EOS, documents back to back
    shards/<slice>/00000.docs.npy   int64 start offset of every document in that shard

A shard is written under a temporary name and renamed when complete; the index names only complete shards,
so a run that stops anywhere keeps every shard it finished, and a rerun overwrites any shard the index does
not name.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from corpus.errors import DataError

log = logging.getLogger(__name__)

FORMAT = "corpus-shards-v1"
INDEX = "index.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def read_index(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path}: unreadable index ({e}); delete {folder} and prepare again") from e
    if index.get("format") != FORMAT:
        raise DataError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}; prepare the data again")
    return index


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Collects tokenized documents per slice in memory; `commit` turns them into shards and saves the index.

    The caller puts its resume position into `index["progress"]` before each commit.
    """

    def __init__(self, folder: str | os.PathLike, index: dict):
        self.folder, self.index = Path(folder), index
        self.dtype = np.dtype(index["dtype"])
        self._pending: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        self.pending_tokens = 0

    def add(self, slice_name: str, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """`tokens`: documents back to back (BOS text EOS each); `doc_lengths`: their lengths, in order."""
        toks, lens = self._pending.setdefault(slice_name, ([], []))
        toks.append(np.asarray(tokens, dtype=self.dtype))
        lens.append(np.asarray(doc_lengths, dtype=np.int64))
        self.pending_tokens += len(tokens)

    def commit(self, complete: bool = False) -> None:
        slices = self.index.setdefault("slices", {})
        for name in sorted(self._pending):
            toks, lens = self._pending[name]
            tokens, lengths = np.concatenate(toks), np.concatenate(lens)
            if len(tokens) == 0:
                continue
            entry = slices.setdefault(name, {"tokens": 0, "docs": 0, "shards": []})
            stem = f"{name}/{len(entry['shards']):05d}" if name else f"{len(entry['shards']):05d}"
            base = self.folder / "shards" / stem
            base.parent.mkdir(parents=True, exist_ok=True)
            starts = np.zeros(len(lengths), dtype=np.int64)
            np.cumsum(lengths[:-1], out=starts[1:])
            write_atomic(base.with_name(base.name + ".docs.npy"), _npy_bytes(starts))
            write_atomic(base.with_name(base.name + ".bin"), tokens.tobytes())
            entry["shards"].append({"name": stem, "tokens": int(len(tokens)), "docs": int(len(lengths))})
            entry["tokens"] += int(len(tokens))
            entry["docs"] += int(len(lengths))
        self._pending.clear()
        self.pending_tokens = 0
        self.index["complete"] = complete
        write_atomic(self.folder / INDEX, json.dumps(self.index, indent=1).encode())


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


class TokenStream:
    """One slice's shards read as one token stream: `read(start, n)` and `doc_starts(start, end)`.

    Shards are memory-mapped on first use; at most `max_open` stay open (each map holds a file descriptor).
    """

    def __init__(self, folder: Path, entry: dict, dtype: np.dtype, max_open: int = 64):
        self.folder, self.dtype, self.max_open = Path(folder), np.dtype(dtype), max_open
        self.names = [s["name"] for s in entry["shards"]]
        sizes = np.array([s["tokens"] for s in entry["shards"]], dtype=np.int64)
        self.offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=self.offsets[1:])
        self.num_tokens = int(self.offsets[-1])
        self.num_docs = int(entry["docs"])
        self._open: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _shard(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        base = self.folder / "shards" / self.names[i]
        bin_path, docs_path = base.with_name(base.name + ".bin"), base.with_name(base.name + ".docs.npy")
        try:
            tokens = np.memmap(bin_path, dtype=self.dtype, mode="r")
            docs = np.load(docs_path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{bin_path}: missing or unreadable shard ({e}); prepare the data again") from e
        expected = self.offsets[i + 1] - self.offsets[i]
        if len(tokens) != expected:
            raise DataError(f"{bin_path}: {len(tokens)} tokens, the index says {expected}; the shard is "
                            "damaged: prepare the data again")
        self._open[i] = (tokens, docs)
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return tokens, docs

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the stream, crossing shards where needed."""
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        local = start - int(self.offsets[i])
        tokens = self._shard(i)[0]
        if local + n <= len(tokens):
            return tokens[local:local + n]
        parts, need = [], n
        while need > 0:
            tokens = self._shard(i)[0]
            part = tokens[local:local + need]
            parts.append(part)
            need -= len(part)
            i, local = i + 1, 0
        return np.concatenate(parts)

    def doc_starts(self, start: int, end: int) -> np.ndarray:
        """Stream offsets of the documents that begin in [start, end)."""
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        out = []
        while i < len(self.names) and self.offsets[i] < end:
            base = int(self.offsets[i])
            docs = self._shard(i)[1]
            lo = np.searchsorted(docs, start - base, side="left")
            hi = np.searchsorted(docs, end - base, side="left")
            out.append(np.asarray(docs[lo:hi]) + base)
            i += 1
        return np.concatenate(out) if len(out) > 1 else out[0]


@dataclass(frozen=True)
class PreparedSource:
    """One slice of one prepared folder, with its sampling weight (by tokens) in the whole mixture."""

    name: str      # "slimpajama/arxiv", or the folder name for data without slices
    folder: Path
    slice: str
    weight: float
    num_tokens: int
    num_docs: int
    entry: dict
    dtype: str

    def open(self) -> TokenStream:
        return TokenStream(self.folder, self.entry, np.dtype(self.dtype))


class PreparedDataset:
    """One or more prepared folders and their weights: what `prepare_dataset` returns and the loaders read.

    `weights[i]` weighs folder i by tokens; None for all means each folder in proportion to its tokens.
    Within a folder, slices keep their natural proportions (by tokens).
    """

    def __init__(self, folders, weights=None, names=None):
        self.folders = [Path(f) for f in folders]
        self.indexes = []
        for folder in self.folders:
            index = read_index(folder)
            if index is None:
                raise DataError(f"{folder}: no {INDEX}; run `python -m corpus.prepare -d ... --out ...` first")
            if not index.get("complete"):
                raise DataError(f"{folder}: preparation of {index.get('spec')!r} did not finish; run prepare "
                                "again with the same data and tokenizer to complete it")
            self.indexes.append(index)
        first = self.indexes[0]
        for folder, index in zip(self.folders, self.indexes):
            for key in ("vocab_size", "bos_id", "eos_id"):
                if index[key] != first[key]:
                    raise DataError(f"{folder} was prepared with {key}={index[key]}, {self.folders[0]} with "
                                    f"{first[key]}: a mixture needs one tokenizer; prepare both with the same one")
        self.vocab_size, self.bos_id, self.eos_id = first["vocab_size"], first["bos_id"], first["eos_id"]
        self.tokenizer = first["tokenizer"]
        self.names = _unique(names or [f.name for f in self.folders])
        if weights is not None and any(w is None for w in weights) and not all(w is None for w in weights):
            raise DataError("give a weight to every part of the mixture or to none (e.g. 'a:0.7,b:0.3')")
        self.weights = None if weights is None or weights[0] is None else [float(w) for w in weights]
        if self.weights is not None and (len(self.weights) != len(self.folders) or min(self.weights) < 0
                                         or sum(self.weights) <= 0):
            raise DataError(f"mixture weights {self.weights} must be one non-negative number per part, not all 0")
        self.sources = self._sources()

    @classmethod
    def open(cls, folder: str | os.PathLike) -> PreparedDataset:
        return cls([folder])

    def _sources(self) -> list[PreparedSource]:
        sources = []
        totals = [sum(e["tokens"] for e in ix["slices"].values()) for ix in self.indexes]
        grand = sum(totals)
        for i, (folder, index, name) in enumerate(zip(self.folders, self.indexes, self.names)):
            if totals[i] == 0:
                raise DataError(f"{folder} holds no tokens (every document empty or excluded); check the data "
                                "and --exclude")
            share = totals[i] / grand if self.weights is None else self.weights[i] / sum(self.weights)
            for sl in sorted(index["slices"]):
                e = index["slices"][sl]
                sources.append(PreparedSource(
                    name=f"{name}/{sl}" if sl else name, folder=folder, slice=sl,
                    weight=share * e["tokens"] / totals[i], num_tokens=e["tokens"], num_docs=e["docs"],
                    entry=e, dtype=index["dtype"]))
        return sources

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.sources)

    def summary(self) -> dict:
        return {"tokenizer": self.tokenizer, "vocab_size": self.vocab_size, "tokens": self.num_tokens,
                "sources": {s.name: {"weight": round(s.weight, 6), "tokens": s.num_tokens, "docs": s.num_docs}
                            for s in self.sources},
                "folders": [str(f) for f in self.folders]}

    def __repr__(self):
        return f"PreparedDataset({self.summary()})"


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out
