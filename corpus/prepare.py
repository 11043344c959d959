"""Tokenize raw data into binary shards once, with several processes; resumable and idempotent.

    python -m corpus.prepare -d data/SlimPajama-627B --tokenizer data/sample/tokenizer --out data/prepared \
        --exclude github --workers 8
    python -m corpus.prepare -d "data/SlimPajama-627B:0.7,data/starcoderdata:0.3" --tokenizer ... --out ...

Each part of a spec is prepared into its own folder under --out, named from the data and keyed by (data,
tokenizer, exclude), so a different tokenizer never reuses stale shards and a rerun finds finished work.
Files are read in sorted order by the main process and tokenized in worker processes, in order; every
`shard_tokens` tokens the pending documents become shards and the index records how far the input was read,
so a stopped run continues from its last shard. Bad input stops with a DataError that names the file and line
(after keeping what was finished); a malformed JSON line is skipped and counted unless --on_bad_line error.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import os
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from corpus.errors import DataError
from corpus.mixture import parse_mixture
from corpus.shards import FORMAT, PreparedDataset, ShardWriter, read_index, token_dtype
from corpus.sources import SLICES, BadLine, canonical_slice, open_source, source_name

log = logging.getLogger(__name__)

SHARD_TOKENS = 1 << 26          # ~64M tokens a commit: 128 MB of uint16 pending at most
BATCH_CHARS, BATCH_DOCS = 1 << 20, 1024
MAX_BAD_EXAMPLES = 20
DONE_FILES = "done_files.txt"  # finished input files, one a line; the index says how many lines count


def prepare_dataset(spec: str, tokenizer, cache_dir: str | os.PathLike, *, workers: int | None = None,
                    exclude: Sequence[str] = (), on_bad_line: str = "skip", progress: bool = True,
                    shard_tokens: int = SHARD_TOKENS) -> PreparedDataset:
    """Prepare every part of `spec` (see module doc) under `cache_dir`; return them as one PreparedDataset.

    A part that is already a prepared folder (it holds index.json) is used as it is.
    """
    if on_bad_line not in ("skip", "error"):
        raise ValueError(f"on_bad_line must be 'skip' or 'error', not {on_bad_line!r}")
    workers = _default_workers() if workers is None else int(workers)
    excluded = sorted({canonical_slice(x) for x in exclude})
    parts = []  # (weight, folder, name, raw source or None when the folder is complete)
    known = set(SLICES)
    for part, weight in parse_mixture(spec):
        path = Path(part).expanduser()
        index = read_index(path) if path.is_dir() else None
        if index is not None:  # already a prepared folder
            _check_prepared(path, index, tokenizer, excluded)
            parts.append((weight, path, index.get("name") or path.name, None))
            known |= set(index["slices"])
            continue
        folder = Path(cache_dir) / f"{source_name(part)}-{_key(part, tokenizer, excluded)}"
        index = read_index(folder)
        if index is not None and index["complete"]:  # prepared before: nothing to list or read
            parts.append((weight, folder, index["name"], None))
            known |= set(index["slices"]) | set(index["exclude"])
            continue
        src = open_source(part)
        parts.append((weight, folder, src.name, (part, src)))
        known |= src.slice_names()
    unknown = [x for x in excluded if x not in known]
    if unknown:
        raise DataError(f"--exclude {' '.join(unknown)}: no such slice; slices here: {', '.join(sorted(known))}")
    for _, folder, _, raw in parts:
        if raw is not None:
            _prepare_source(*raw, tokenizer, folder, workers=workers, exclude=excluded, on_bad_line=on_bad_line,
                            progress=progress, shard_tokens=shard_tokens)
    return PreparedDataset([f for _, f, _, _ in parts], [w for w, _, _, _ in parts], [n for _, _, n, _ in parts])


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _key(part: str, tokenizer, excluded: list[str]) -> str:
    path = Path(part).expanduser()
    what = {"data": str(path.resolve()) if path.exists() else part, "tokenizer": tokenizer.source,
            "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
            "exclude": excluded, "format": FORMAT}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def _check_prepared(folder: Path, index: dict, tokenizer, excluded: list[str]) -> None:
    for key in ("vocab_size", "bos_id", "eos_id"):
        if index[key] != getattr(tokenizer, key):
            raise DataError(f"{folder} was prepared with a tokenizer whose {key} is {index[key]} "
                            f"({index['tokenizer']}), the tokenizer given has {getattr(tokenizer, key)} "
                            f"({tokenizer.source}); prepare the raw data with this tokenizer")
    if index["tokenizer"] != tokenizer.source:
        log.warning("%s was prepared with tokenizer %s; using it with %s (same vocabulary and special ids)",
                    folder, index["tokenizer"], tokenizer.source)
    clash = sorted(set(excluded) & set(index["slices"]))
    if clash:
        raise DataError(f"{folder} is prepared and holds slice(s) {', '.join(clash)} that --exclude names; "
                        "prepare from the raw data with --exclude, or drop --exclude")


@dataclass
class _Batch:
    """Documents read from one file, up to position `end_pos` of it (what a commit records)."""

    file: str
    path: str
    end_pos: int = 0
    done: bool = False
    texts: list[str] = field(default_factory=list)
    slices: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    chars: int = 0
    records: int = 0
    empty: int = 0
    bad: list[str] = field(default_factory=list)
    excluded: dict[str, int] = field(default_factory=dict)
    excluded_file: bool = False


def _batches(source, files, resume_file, resume_pos, exclude, on_bad_line, batch_chars):
    for f in files:
        b = _Batch(f.rel, str(f.path or f.rel))
        if f.slice and f.slice in exclude:  # a whole file of an excluded slice is never read
            b.done, b.excluded_file = True, True
            yield b
            continue
        try:
            for rec in source.read(f, resume_pos if f.rel == resume_file else 0):
                if isinstance(rec, BadLine) and on_bad_line == "error":
                    raise DataError(f"{rec.message}; fix or remove the line, or pass --on_bad_line skip")
                b.records += 1
                b.end_pos = rec.pos
                if isinstance(rec, BadLine):
                    b.bad.append(rec.message)
                elif rec.slice in exclude:
                    b.excluded[rec.slice] = b.excluded.get(rec.slice, 0) + 1
                elif not rec.text:
                    b.empty += 1
                else:
                    b.texts.append(rec.text)
                    b.slices.append(rec.slice)
                    b.positions.append(rec.pos)
                    b.chars += len(rec.text)
                if b.chars >= batch_chars or len(b.texts) >= BATCH_DOCS:
                    yield b
                    b = _Batch(f.rel, b.path, end_pos=b.end_pos)
        except DataError:
            if b.records:  # the good records before the bad one are kept too
                yield b
            raise
        b.done = True
        yield b


# Worker side: the tokenizer arrives once per process, batches of texts come and arrays go back.
_WORKER: dict = {}


def _init_worker(tokenizer, dtype: str) -> None:
    _WORKER.update(tokenizer=tokenizer, dtype=np.dtype(dtype))


def _tokenize(texts: list[str], slices: list[str]):
    """{slice: (tokens, doc_lengths)} with each document as BOS ids EOS; or ('bad_id', doc, id)."""
    tok, dtype = _WORKER["tokenizer"], _WORKER["dtype"]
    ids = tok.encode_batch(texts) if texts else []
    vocab, bos, eos = tok.vocab_size, tok.bos_id, tok.eos_id
    out = {}
    for sl in dict.fromkeys(slices):
        docs = [i for i, s in enumerate(slices) if s == sl]
        lengths = np.fromiter((len(ids[i]) + 2 for i in docs), dtype=np.int64, count=len(docs))
        flat = np.empty(int(lengths.sum()), dtype=np.int64)
        pos = 0
        for i, n in zip(docs, lengths):
            flat[pos] = bos
            flat[pos + 1:pos + n - 1] = ids[i]
            flat[pos + n - 1] = eos
            pos += n
        bad = (flat >= vocab) | (flat < 0)
        if bad.any():
            at = int(np.argmax(bad))
            doc = docs[int(np.searchsorted(np.cumsum(lengths), at, side="right"))]
            return ("bad_id", doc, int(flat[at]))
        out[sl] = (flat.astype(dtype), lengths)
    return out


class _Ready:
    def __init__(self, result):
        self.result = result

    def get(self):
        return self.result


class _Pool:
    """Worker processes tokenizing in order, or the calling process when workers <= 1."""

    def __init__(self, tokenizer, workers: int, dtype: str):
        self.workers = workers
        if workers > 1:
            self._pool = mp.get_context().Pool(workers, initializer=_init_worker, initargs=(tokenizer, dtype))
        else:
            _init_worker(tokenizer, dtype)

    def submit(self, b: _Batch):
        if self.workers > 1:
            return self._pool.apply_async(_tokenize, (b.texts, b.slices))
        return _Ready(_tokenize(b.texts, b.slices))

    def close(self, ok: bool) -> None:
        if self.workers > 1:
            (self._pool.close if ok else self._pool.terminate)()
            self._pool.join()


class _DoneLog:
    """The names of finished input files, appended at each commit (a long list is not rewritten each time)."""

    def __init__(self, path: Path, count: int):
        self.path = path
        self.names = path.read_text().splitlines()[:count] if path.exists() else []
        if len(self.names) < count:
            raise DataError(f"{path} lists {len(self.names)} finished files, the index {count}: the folder is "
                            f"damaged; delete {path.parent} and prepare again")
        path.write_text("".join(n + "\n" for n in self.names))  # drop lines a crash left past the index
        self._new: list[str] = []

    def add(self, name: str) -> None:
        self._new.append(name)

    def flush(self) -> int:
        if self._new:
            with open(self.path, "a") as f:
                f.write("".join(n + "\n" for n in self._new))
                f.flush()
                os.fsync(f.fileno())
            self.names += self._new
            self._new = []
        return len(self.names)


def _new_index(part: str, name: str, tokenizer, exclude: list[str]) -> dict:
    return {"format": FORMAT, "spec": part, "name": name, "tokenizer": tokenizer.source,
            "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
            "dtype": token_dtype(tokenizer.vocab_size).name, "exclude": exclude, "complete": False,
            "slices": {}, "progress": {"done_count": 0, "file": None, "pos": 0},
            "counts": {"records": 0, "docs": 0, "tokens": 0, "empty_docs": 0, "bad_lines": 0,
                       "excluded_files": 0, "excluded_docs": {}},
            "bad_line_examples": []}


def _prepare_source(part: str, source, tokenizer, folder: Path, *, workers: int, exclude: list[str],
                    on_bad_line: str, progress: bool, shard_tokens: int) -> None:
    index = read_index(folder)
    if index is not None and index["complete"]:
        return
    folder.mkdir(parents=True, exist_ok=True)
    if index is None:
        index = _new_index(part, source.name, tokenizer, exclude)
    else:
        log.info("%s: resuming an unfinished prepare (%d files done)", folder, index["progress"]["done_count"])
    prog, counts = index["progress"], index["counts"]
    done_log = _DoneLog(folder / DONE_FILES, prog["done_count"])
    done = set(done_log.names)
    files = [f for f in source.files if f.rel not in done]
    writer = ShardWriter(folder, index)
    from tqdm import tqdm

    sizes = {f.rel: f.size for f in files}
    bar = tqdm(total=sum(sizes.values()) if None not in sizes.values() else None, unit="B", unit_scale=True,
               desc=f"prepare {source.name}", disable=not progress)
    vocab = tokenizer.vocab_size

    def apply(b: _Batch, result) -> None:
        if isinstance(result, tuple):
            _, doc, bad_id = result
            raise DataError(f"{b.path}:{b.positions[doc]}: the tokenizer {tokenizer.source!r} produced id "
                            f"{bad_id}, beyond its vocabulary of {vocab} ids; the tokenizer files disagree with "
                            "each other: fix or replace the tokenizer")
        for sl, (tokens, lengths) in result.items():
            writer.add(sl, tokens, lengths)
            counts["tokens"] += len(tokens)
        counts["records"] += b.records
        counts["docs"] += len(b.texts)
        counts["empty_docs"] += b.empty
        counts["bad_lines"] += len(b.bad)
        counts["excluded_files"] += b.excluded_file
        for sl, n in b.excluded.items():
            counts["excluded_docs"][sl] = counts["excluded_docs"].get(sl, 0) + n
        for message in b.bad:
            if len(index["bad_line_examples"]) < MAX_BAD_EXAMPLES:
                log.warning("skipped: %s", message)
                index["bad_line_examples"].append(message)
        if b.done:
            done_log.add(b.file)
            prog["file"], prog["pos"] = None, 0
            bar.update(sizes[b.file] or 0)
        else:
            prog["file"], prog["pos"] = b.file, b.end_pos
        bar.set_postfix(tokens=f"{counts['tokens']:,}", bad_lines=counts["bad_lines"], refresh=False)
        if writer.pending_tokens >= shard_tokens:
            commit()

    def commit(complete: bool = False) -> None:
        prog["done_count"] = done_log.flush()  # the files' names are on disk before the index counts them
        writer.commit(complete)

    pool = _Pool(tokenizer, workers, index["dtype"])
    inflight: deque = deque()
    ok = False
    try:
        read_error = None
        try:
            batches = _batches(source, files, prog["file"], prog["pos"], set(exclude), on_bad_line,
                               min(BATCH_CHARS, shard_tokens))
            for b in batches:
                inflight.append((b, pool.submit(b)))
                while len(inflight) > 2 * max(workers, 1) + 2:
                    b0, r0 = inflight.popleft()
                    apply(b0, r0.get())
        except DataError as e:  # the reader failed: the batches before it are good, keep them
            read_error = e
        while inflight:
            b0, r0 = inflight.popleft()
            apply(b0, r0.get())
        if read_error is not None:
            raise read_error
        commit(complete=True)
        ok = True
    except (DataError, KeyboardInterrupt):
        commit()  # keep every batch applied so far; progress points just past the last one
        raise
    finally:
        pool.close(ok)
        bar.close()
    log.info("%s: %s", folder, json.dumps(counts))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m corpus.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("-d", "--data", required=True,
                   help="a path (jsonl, jsonl.zst, parquet, txt; RedPajama, SlimPajama, StarCoder layouts), a hub "
                        "name, or a mixture 'pathA:0.7,pathB:0.3' weighted by tokens")
    p.add_argument("--tokenizer", required=True, help="a tokenizer spec for corpus.tokenizer.load_tokenizer")
    p.add_argument("--out", required=True, help="cache folder; each part of --data is prepared into a subfolder")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: every core)")
    p.add_argument("--exclude", nargs="*", default=[], help="slices to leave out, e.g. github")
    p.add_argument("--on_bad_line", choices=("skip", "error"), default="skip",
                   help="a malformed JSON line: skip and count it, or stop")
    p.add_argument("--shard_tokens", type=int, default=SHARD_TOKENS, help="tokens per commit (shard size)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from corpus.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(args.tokenizer)
        prepared = prepare_dataset(args.data, tokenizer, args.out, workers=args.workers, exclude=args.exclude,
                                   on_bad_line=args.on_bad_line, progress=not args.no_progress,
                                   shard_tokens=args.shard_tokens)
    except (DataError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(prepared.summary()))


if __name__ == "__main__":
    main()
