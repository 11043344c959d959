"""Where documents come from: RedPajama, SlimPajama, StarCoder, any jsonl / parquet / text folder, or a hub name.

    src = open_source("data/SlimPajama-627B")            # a local copy: reads train/ (see below)
    for f in src.files:
        for rec in src.read(f):                           # Record(pos, text, slice) or BadLine(pos, message)
            ...

Layouts recognised from the files themselves, so one reader serves them all:
- RedPajama-Data-1T: one folder per slice (arxiv/, book/, c4/, common_crawl/, github/, stackexchange/,
  wikipedia/) of jsonl (or .jsonl.zst); the folder names the slice.
- RedPajama-Data-1T-Sample: files at the top, named by slice (arxiv_*.jsonl, c4-train.*.jsonl, cc_*.jsonl, ...).
- SlimPajama-627B: train/, validation/, test/ of chunk*/ *.jsonl.zst; `meta.redpajama_set_name` names the
  slice of each record. A folder with a train/ split reads only train/: point at .../validation for that.
- StarCoder data: one folder per language of parquet with a `content` column; the folder names the slice.
- Anything else: jsonl (`text` or `content` field), parquet (`text` or `content` column), or .txt files (one
  document per file, read only where a folder holds no jsonl or parquet). A first-level subfolder is a slice.
- A hub name ("owner/name", "owner/name@config"): `datasets.load_dataset(..., split="train", streaming=True)`.
"""
from __future__ import annotations

import gzip
import itertools
import json
import logging
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from corpus.errors import DataError

log = logging.getLogger(__name__)

SLICES = ("arxiv", "book", "c4", "common_crawl", "github", "stackexchange", "wikipedia")
SPLITS = ("train", "validation", "test")
TEXT_FIELDS = ("text", "content")  # RedPajama / SlimPajama use text, StarCoder content
_ALIASES = {"commoncrawl": "common_crawl", "cc": "common_crawl", "common-crawl": "common_crawl",
            "wiki": "wikipedia", "stack_exchange": "stackexchange", "books": "book"}
_SUFFIXES = {  # suffix -> (format, compression); longest match wins
    ".jsonl": ("jsonl", None), ".json": ("jsonl", None),
    ".jsonl.zst": ("jsonl", "zst"), ".json.zst": ("jsonl", "zst"),
    ".jsonl.gz": ("jsonl", "gz"), ".json.gz": ("jsonl", "gz"),
    ".parquet": ("parquet", None), ".txt": ("text", None),
}
_NOT_DATA = {  # metadata that hub downloads and tokenizer folders keep beside the data
    "dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json", "index.json", "manifest.json",
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"}
_CHUNK_BYTES = 1 << 20
_HUB_NAME = re.compile(r"^(?P<name>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<data_dir>[\w./-]+))?(?:@(?P<config>[\w.-]+))?$")


def canonical_slice(name: str) -> str:
    """'RedPajamaCommonCrawl', 'common_crawl' and 'cc' all name one slice: 'common_crawl'."""
    s = name.strip().lower()
    s = s[len("redpajama"):] if s.startswith("redpajama") and len(s) > len("redpajama") else s
    s = _ALIASES.get(s, s)
    return re.sub(r"[^a-z0-9_.+-]", "_", s)


@dataclass(frozen=True)
class DataFile:
    rel: str             # path relative to the source root (posix), or the hub name: the resume key
    path: Path | None    # None for a hub stream
    format: str          # jsonl | parquet | text | hub
    compression: str | None
    slice: str           # from the layout; a record's meta.redpajama_set_name overrides it
    size: int | None     # bytes on disk, for the progress bar


@dataclass(frozen=True)
class Record:
    pos: int    # 1-based line (jsonl), row (parquet, hub) or 1 (text): where to resume, what to name in errors
    text: str
    slice: str


@dataclass(frozen=True)
class BadLine:
    pos: int
    message: str  # "file:line: what was wrong"


def open_source(spec: str) -> LocalSource | HubSource:
    """A local file or folder, else a hub name. Raises DataError when it is neither."""
    path = Path(spec).expanduser()
    if path.exists():
        return LocalSource(path)
    hub = _HUB_NAME.match(spec)
    if hub and not spec.startswith((".", "~")):
        return HubSource(hub["name"], hub["config"], hub["data_dir"])
    raise DataError(f"data {spec!r} not found: expected a local file or folder (jsonl, jsonl.zst, parquet, txt) "
                    f"or a hub name like 'cerebras/SlimPajama-627B'")


def source_name(spec: str) -> str:
    """The name open_source(spec) will have, without listing any files: 'SlimPajama-627B', 'python', ..."""
    path = Path(spec).expanduser()
    if path.exists():
        path = _split_folder(Path(os.path.abspath(path)))  # "." names the folder it is
        return _strip_suffix(path.parent.name if path.name in SPLITS else path.name)
    hub = _HUB_NAME.match(spec)
    return hub["name"].split("/")[-1] if hub else spec


def _split_folder(path: Path) -> Path:
    if path.is_dir() and (path / "train").is_dir() and any((path / s).is_dir() for s in SPLITS[1:]):
        return path / "train"
    return path


class LocalSource:
    def __init__(self, path: Path):
        path, given = _split_folder(Path(path)), Path(path)
        if path != given:
            log.info("%s has split folders: reading train/ only (point at %s to read another split)",
                     given, given / "validation")
        self.root = path if path.is_dir() else path.parent
        self.name = source_name(str(given))
        self.files = _list_files(path, self.root)
        if not self.files:
            raise DataError(f"{path}: no data files found; expected {', '.join(sorted(_SUFFIXES))} files")
        empty = [f.rel for f in self.files if f.size == 0]
        if empty:
            raise DataError(f"{self.root / empty[0]} is empty ({len(empty)} empty file(s) in all); "
                            f"re-download or remove {'it' if len(empty) == 1 else 'them'}")

    def slice_names(self) -> set[str]:
        return {f.slice for f in self.files if f.slice} | set(SLICES)

    def read(self, f: DataFile, skip_to: int = 0) -> Iterator[Record | BadLine]:
        """Records after position `skip_to`. Raises DataError for an empty, corrupt or unreadable file."""
        readers = {"jsonl": _read_jsonl, "parquet": _read_parquet, "text": _read_text}
        yield from readers[f.format](f, skip_to)


class HubSource:
    """A `datasets` hub dataset, streamed; a single 'file' whose positions are row numbers.

    "owner/name@config" picks a config (RedPajama-Data-1T@arxiv), "owner/name/folder" a data_dir
    (bigcode/starcoderdata/python); either names the slice.
    """

    def __init__(self, name: str, config: str | None = None, data_dir: str | None = None, split: str = "train"):
        self.name, self.hub_name = name.split("/")[-1], name
        self.config, self.data_dir, self.split = config, data_dir, split
        rel = name + (f"/{data_dir}" if data_dir else "") + (f"@{config}" if config else "")
        sl = canonical_slice(config or data_dir.strip("/").split("/")[-1]) if config or data_dir else ""
        self.files = [DataFile(rel=rel, path=None, format="hub", compression=None, slice=sl, size=None)]

    def slice_names(self) -> set[str]:
        return {f.slice for f in self.files if f.slice} | set(SLICES)

    def read(self, f: DataFile, skip_to: int = 0) -> Iterator[Record | BadLine]:
        import datasets

        try:
            ds = datasets.load_dataset(self.hub_name, self.config, data_dir=self.data_dir, split=self.split,
                                       streaming=True)
        except Exception as e:
            raise DataError(f"{f.rel!r} is not a local path and could not be loaded from the hub "
                            f"({type(e).__name__}: {e}); check the name, or download it and pass the folder") from e
        if skip_to:
            ds = ds.skip(skip_to)
        for pos, row in enumerate(ds, start=skip_to + 1):
            yield Record(pos, _text_of(row, f"{f.rel} row {pos}"), _slice_of(row, f.slice))


def _strip_suffix(name: str) -> str:
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _kind(name: str) -> tuple[str, str | None] | None:
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return _SUFFIXES[suffix]
    return None


def _list_files(path: Path, root: Path) -> list[DataFile]:
    if path.is_file():
        found = [path] if _kind(path.name) else []
        if not found:
            raise DataError(f"{path}: unknown file type; expected {', '.join(sorted(_SUFFIXES))}")
    else:
        found = []
        for folder, dirs, names in os.walk(path):
            if "index.json" in names and "shards" in dirs:  # a prepared folder (--out inside the data)
                dirs[:] = []
                continue
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
            found += [Path(folder) / n for n in sorted(names)
                      if not n.startswith(".") and n not in _NOT_DATA and _kind(n)]
    # .txt beside structured data is documentation (README, url lists), not text to train on
    if any(_kind(p.name)[0] != "text" for p in found):
        found = [p for p in found if _kind(p.name)[0] != "text"]
    files = []
    for p in sorted(found, key=lambda p: p.relative_to(root).as_posix()):
        fmt, comp = _kind(p.name)
        rel = p.relative_to(root).as_posix()
        files.append(DataFile(rel, p, fmt, comp, _layout_slice(rel), p.stat().st_size))
    return files


def _layout_slice(rel: str) -> str:
    """The slice a file's place names: its first-level folder, else a RedPajama-Sample file-name prefix."""
    parts = rel.split("/")
    for d in parts[:-1]:
        if d not in SPLITS and not re.fullmatch(r"chunk\d+", d):
            return canonical_slice(d)
    prefix = canonical_slice(re.split(r"[_.\-]", parts[-1])[0])
    return prefix if prefix in SLICES else ""


def _text_of(obj, where: str) -> str:
    for key in TEXT_FIELDS:
        if key in obj:
            value = obj[key]
            if not isinstance(value, str):
                raise DataError(f"{where}: field {key!r} is {type(value).__name__}, expected a string; "
                                "fix or remove the record")
            return value
    raise DataError(f"{where}: record has no 'text' or 'content' field (it has {sorted(obj)[:10]}); "
                    "fix or remove the record, or convert the file to a text field")


def _slice_of(obj, default: str) -> str:
    meta = obj.get("meta") if hasattr(obj, "get") else None
    if isinstance(meta, str) and "redpajama_set_name" in meta:
        try:
            meta = json.loads(meta)
        except ValueError:
            meta = None
    if isinstance(meta, dict) and isinstance(meta.get("redpajama_set_name"), str):
        return canonical_slice(meta["redpajama_set_name"])
    return default


def _chunks(f: DataFile) -> Iterator[bytes]:
    """The file's decompressed bytes in chunks; a corrupt or truncated stream is a DataError."""
    with open(f.path, "rb") as raw:
        try:
            if f.compression == "zst":
                yield from _zst_chunks(raw)
            elif f.compression == "gz":
                with gzip.GzipFile(fileobj=raw) as g:
                    yield from iter(lambda: g.read(_CHUNK_BYTES), b"")
            else:
                yield from iter(lambda: raw.read(_CHUNK_BYTES), b"")
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{f.path}: corrupt or truncated {f.compression or ''} file ({e}); "
                            "re-download or remove it") from e
        except Exception as e:
            if type(e).__name__ == "ZstdError":
                raise DataError(f"{f.path}: corrupt zstd stream ({e}); re-download or remove it") from e
            raise


def _zst_chunks(raw) -> Iterator[bytes]:
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj, fed = dctx.decompressobj(), False
    for data in iter(lambda: raw.read(_CHUNK_BYTES), b""):
        while data:
            out = dobj.decompress(data)
            fed = True
            if out:
                yield out
            data = b""
            if dobj.eof:  # a file may hold several frames
                data, dobj, fed = dobj.unused_data, dctx.decompressobj(), False
    if fed and not dobj.eof:
        raise zstandard.ZstdError("the last frame ends early: the file is truncated")


def json_records(path: str | os.PathLike, skip_to: int = 0) -> Iterator[tuple[int, dict | BadLine]]:
    """(line, object) for each non-blank line of a jsonl / jsonl.zst / jsonl.gz file, or BadLine for a malformed
    one; a .json file that holds one JSON array gives (element number, object). Raises DataError if empty."""
    path = Path(path)
    fmt, comp = _kind(path.name) or ("jsonl", None)
    f = DataFile(path.name, path, fmt, comp, "", None)
    chunks = _chunks(f)
    first = next(chunks, b"")
    if path.name.endswith(".json") and first.lstrip()[:1] == b"[":
        try:
            items = json.loads(first + b"".join(chunks))
        except ValueError as e:
            raise DataError(f"{path}: malformed JSON array ({e}); fix the file or convert it to jsonl") from e
        if not items:
            raise DataError(f"{path} holds an empty array; remove it")
        for pos, obj in enumerate(items, start=1):
            if pos > skip_to:
                yield pos, obj if isinstance(obj, dict) else BadLine(
                    pos, f"{path} element {pos}: expected a JSON object, got {type(obj).__name__}")
        return
    records, tail, pos = 0, b"", 0
    for chunk in itertools.chain([first], chunks):
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        for line in lines:
            pos += 1
            if line.strip():
                records += 1
                if pos > skip_to:
                    yield pos, _parse_json(path, pos, line)
    if tail.strip():
        pos += 1
        records += 1
        if pos > skip_to:
            yield pos, _parse_json(path, pos, tail)
    if records == 0:
        raise DataError(f"{path} holds no records (only blank lines); re-download or remove it")


def _parse_json(path: Path, pos: int, line: bytes) -> dict | BadLine:
    try:
        obj = json.loads(line)
    except ValueError as e:  # includes a line that is not UTF-8
        return BadLine(pos, f"{path}:{pos}: malformed JSON ({e})")
    if not isinstance(obj, dict):
        return BadLine(pos, f"{path}:{pos}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_jsonl(f: DataFile, skip_to: int) -> Iterator[Record | BadLine]:
    for pos, obj in json_records(f.path, skip_to):
        if isinstance(obj, BadLine):
            yield obj
        else:
            yield Record(pos, _text_of(obj, f"{f.path}:{pos}"), _slice_of(obj, f.slice))


def _read_parquet(f: DataFile, skip_to: int) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f.path)
    except Exception as e:
        raise DataError(f"{f.path}: not a readable parquet file ({type(e).__name__}: {e}); "
                        "re-download or remove it") from e
    names = pf.schema_arrow.names
    field = next((k for k in TEXT_FIELDS if k in names), None)
    if field is None:
        raise DataError(f"{f.path}: no 'text' or 'content' column (columns: {names[:10]}); "
                        "convert the file to one of those")
    if pf.metadata.num_rows == 0:
        raise DataError(f"{f.path} has no rows; re-download or remove it")
    columns = [field] + (["meta"] if "meta" in names else [])
    pos = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            texts = batch.column(field).to_pylist()
            metas = batch.column("meta").to_pylist() if "meta" in columns else None
            for i, text in enumerate(texts):
                pos += 1
                if pos <= skip_to:
                    continue
                if not isinstance(text, str):
                    raise DataError(f"{f.path} row {pos}: column {field!r} is {type(text).__name__}, "
                                    "expected a string; fix or remove the row")
                sl = _slice_of({"meta": metas[i]}, f.slice) if metas else f.slice
                yield Record(pos, text, sl)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{f.path}: corrupt parquet data near row {pos + 1} ({type(e).__name__}: {e}); "
                        "re-download or remove it") from e


def _read_text(f: DataFile, skip_to: int) -> Iterator[Record]:
    if skip_to >= 1:
        return
    data = b"".join(_chunks(f))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{f.path}: not UTF-8 text (byte {e.start}); convert it to UTF-8 or remove it") from e
    if not text.strip():
        raise DataError(f"{f.path} holds only whitespace; remove it")
    yield Record(1, text, f.slice)
