"""Finetuning data: instruction and chat jsonl -> rows of whole examples, the loss on responses only.

    loader = SFTLoader("data/alpaca.jsonl", tok, seq_len=2048, batch_size=8, rank=r, world_size=w, seed=0)
    batch = next(loader)          # input_ids, labels, position_ids: (8, 2048) int64, as PretrainLoader's

Records, one JSON object a line (.jsonl, .jsonl.zst, or a .json array as Alpaca ships it):
    instruction  {"instruction": ..., "input": ... (optional), "output": ...}
    chat         {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}

The prompt template is plain text, so no chat-template files are needed ("|" marks where labels begin):
    instruction  BOS "### Instruction:\n{instruction}\n\n" ["### Input:\n{input}\n\n"] "### Response:\n" | {output} EOS
    chat         BOS ["### System:\n{system}\n\n"] then per turn "### User:\n{user}\n\n" or
                 "### Assistant:\n" | {assistant} EOS
Labels are -100 on prompts, on padding and where the next token is another example's. Each piece is tokenized
on its own and the ids joined, so a piece's ids do not depend on its neighbours.

With pack=True, examples are grouped into rows of seq_len tokens (best-fit decreasing, once) with
position_ids restarting at each; with pack=False each row is one example. The rest of a row is padding
(pad_id, labels -100, its own position run). An example longer than seq_len is truncated to seq_len
(counted in `stats["truncated"]`, with a warning); one left with no response token is dropped (counted).
Rows are shuffled each epoch and shared among ranks as PretrainLoader shares samples, with the same
state_dict / load_state_dict.

With held_out=f, a fixed fraction f of the records (chosen by a fixed hash of their position in the input, not
by the seed) is never trained on: those examples are packed into rows of their own, which `validation()` reads.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from corpus.errors import DataError
from corpus.loader import STATE_VERSION, check_held_out, check_ranks, check_saved_state, rank_slots
from corpus.mixture import Schedule
from corpus.order import permute
from corpus.packing import pack_lengths, window_arrays
from corpus.sources import BadLine, json_records

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
_SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst", ".jsonl.gz", ".json.gz")
_HELD_OUT_KEY = 0x76616C  # fixed, so that runs with other seeds hold out the same examples


def render(record: dict, where: str) -> list[tuple[str, bool]]:
    """An instruction or chat record -> [(text, is_response)] in order, per the template above."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        pieces = []
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {k} must be {{'role': one of {list(ROLES)}, 'content': a "
                                f"string}}, got {str(m)[:80]}")
            role, content = m["role"], m["content"]
            if role == "system":
                pieces.append((f"### System:\n{content}\n\n", False))
            elif role == "user":
                pieces.append((f"### User:\n{content}\n\n", False))
            else:
                pieces += [("### Assistant:\n", False), (content, True)]
        return pieces
    if "instruction" in record and "output" in record:
        inst, inp, out = record["instruction"], record.get("input") or "", record["output"]
        if not all(isinstance(x, str) for x in (inst, inp, out)):
            raise DataError(f"{where}: 'instruction', 'input' and 'output' must be strings")
        prompt = f"### Instruction:\n{inst}\n\n" + (f"### Input:\n{inp}\n\n" if inp else "") + "### Response:\n"
        return [(prompt, False), (out, True)]
    raise DataError(f"{where}: expected 'instruction' and 'output' fields, or 'messages'; the record has "
                    f"{sorted(record)[:10]}")


def _files(path_or_paths) -> list[Path]:
    paths = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.name.endswith(_SUFFIXES))
            if not found:
                raise DataError(f"{p}: no {', '.join(_SUFFIXES)} files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"finetuning data {p} not found; expected a jsonl file or a folder of them")
    return files


class SFTLoader:
    def __init__(self, path_or_paths: str | os.PathLike | Sequence[str | os.PathLike], tokenizer, *, seq_len: int,
                 batch_size: int, rank: int, world_size: int, seed: int, pack: bool = True,
                 on_bad_line: str = "skip", held_out: float = 0.0):
        check_ranks(batch_size, rank, world_size, seq_len)
        check_held_out(held_out)
        if on_bad_line not in ("skip", "error"):
            raise ValueError(f"on_bad_line must be 'skip' or 'error', not {on_bad_line!r}")
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.pack, self.pad_id, self.held_out = pack, tokenizer.pad_id, float(held_out)
        self.stats = {"examples": 0, "truncated": 0, "dropped": 0, "bad_lines": 0}
        self._ids, self._targets, records, num_records = self._load(_files(path_or_paths), tokenizer, on_bad_line)
        lengths = [len(x) for x in self._ids]
        validation = np.isin(records, held_out_records(num_records, held_out))
        if validation.all():
            raise DataError(f"every usable example was held out for validation ({held_out:.1%} of {num_records} "
                            "records); hold out a smaller fraction or add data")
        self._rows = self._pack([i for i in range(len(lengths)) if not validation[i]], lengths)
        self._val_rows = self._pack([i for i in range(len(lengths)) if validation[i]], lengths)
        self.stats["held_out"] = int(validation.sum())
        self._row_tokens = np.array([sum(lengths[i] for i in r) for r in self._rows], dtype=np.int64)
        fill = float(self._row_tokens.sum()) / (len(self._rows) * seq_len)
        self.stats.update(rows=len(self._rows), fill=round(fill, 4))
        self._schedule = Schedule(["sft"], [len(self._rows)], [1.0], seed)
        self._tokens_seen = 0

    def _pack(self, examples: list[int], lengths: list[int]) -> list[list[int]]:
        """Rows of example indices: packed best-fit, or one example a row."""
        if not self.pack:
            return [[i] for i in examples]
        return [[examples[k] for k in row] for row in pack_lengths([lengths[i] for i in examples], self.seq_len)]

    def _load(self, files, tok, on_bad_line):
        pieces, owners, where = [], [], []
        for f in files:
            for pos, rec in json_records(f):
                if isinstance(rec, BadLine):
                    if on_bad_line == "error":
                        raise DataError(f"{rec.message}; fix or remove the line, or pass --on_bad_line skip")
                    log.warning("skipped: %s", rec.message)
                    self.stats["bad_lines"] += 1
                    continue
                for text, is_response in render(rec, f"{f}:{pos}"):
                    pieces.append((text, is_response))
                    owners.append(len(where))
                where.append(f"{f}:{pos}")
        if not where:
            raise DataError(f"no usable examples in {', '.join(map(str, files))}")
        encoded = tok.encode_batch([t for t, _ in pieces])
        ids = [[tok.bos_id] for _ in where]
        targets = [[False] for _ in where]
        for (_, is_response), owner, piece in zip(pieces, owners, encoded):
            ids[owner] += piece
            targets[owner] += [is_response] * len(piece)
            if is_response:
                ids[owner].append(tok.eos_id)
                targets[owner].append(True)
        out_ids, out_targets, records = [], [], []
        for i, (x, t) in enumerate(zip(ids, targets)):
            if len(x) > self.seq_len:
                self.stats["truncated"] += 1
                x, t = x[: self.seq_len], t[: self.seq_len]
            if not any(t[1:]):
                self.stats["dropped"] += 1
                continue
            out_ids.append(np.asarray(x, dtype=np.int64))
            out_targets.append(np.asarray(t, dtype=bool))
            records.append(i)
        self.stats["examples"] = len(out_ids)
        if self.stats["truncated"]:
            log.warning("%d of %d finetuning examples are longer than seq_len %d and were truncated",
                        self.stats["truncated"], len(where), self.seq_len)
        if self.stats["dropped"]:
            log.warning("%d finetuning examples have no response token within seq_len %d and were dropped",
                        self.stats["dropped"], self.seq_len)
        if not out_ids:
            raise DataError(f"every example in {', '.join(map(str, files))} was dropped: no response within "
                            f"seq_len {self.seq_len}; raise seq_len")
        return out_ids, out_targets, np.asarray(records, dtype=np.int64), len(where)

    @property
    def epoch(self) -> int:
        return self._schedule.epoch

    @property
    def samples_per_epoch(self) -> int:
        """Rows in one pass over the examples."""
        return len(self._rows)

    def tokens_seen_per_source(self) -> dict[str, int]:
        """Example tokens (not padding) read so far by all ranks together."""
        return {"sft": self._tokens_seen}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        B = self.batch_size
        _, rows = self._schedule.take(B * self.world_size)
        self._tokens_seen += int(self._row_tokens[rows].sum())
        return self._batch([self._rows[r] for r in rows[self.rank * B:(self.rank + 1) * B]])

    def _batch(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """Rows of example indices -> a batch; an empty row is all padding (labels -100)."""
        T = self.seq_len
        windows = np.full((len(rows), T + 1), self.pad_id, dtype=np.int64)
        starts = np.zeros((len(rows), T + 1), dtype=bool)
        targets = np.zeros((len(rows), T + 1), dtype=bool)
        for b, row in enumerate(rows):
            pos = 0
            for i in row:
                n = len(self._ids[i])
                windows[b, pos:pos + n] = self._ids[i]
                targets[b, pos:pos + n] = self._targets[i]
                starts[b, pos] = True
                pos += n
            starts[b, pos] = True  # padding is a segment of its own (pos <= T: column T is always padding)
        input_ids, labels, position_ids = window_arrays(windows, starts, targets)
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(position_ids)}

    def validation(self, max_tokens: int | None = None) -> SFTHeldOut:
        """The held-out examples as a validation reader (one source, "sft"): its first rows up to max_tokens."""
        if not self._val_rows:
            raise DataError(f"no example is held out for validation (held_out={self.held_out}); hold out a larger "
                            "fraction")
        return SFTHeldOut(self, max_tokens)

    def state_dict(self) -> dict:
        return {"kind": "sft", "version": STATE_VERSION, "seq_len": self.seq_len, "pack": self.pack,
                "held_out": self.held_out,
                "batch_size": self.batch_size, "world_size": self.world_size, "tokens_seen": self._tokens_seen,
                **self._schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        check_saved_state(state, kind="sft", settings={"seq_len": self.seq_len, "pack": self.pack},
                          held_out=self.held_out, held_out_of="the examples")
        self._schedule.load_state_dict(state)
        self._tokens_seen = int(state["tokens_seen"])


def held_out_records(num_records: int, held_out: float) -> np.ndarray:
    """Indices of the records held out for validation: ceil(held_out x num_records), a fixed pseudo-random pick."""
    count = min(num_records, int(np.ceil(held_out * num_records)))
    return permute(np.arange(count), num_records, _HELD_OUT_KEY) if count else np.zeros(0, dtype=np.int64)


class SFTHeldOut:
    """The held-out finetuning rows as a validation reader: one source, "sft", the same rows every time.

    Rows are shared among ranks like training rows; every rank gets as many batches (padding rows are -100).
    """

    def __init__(self, loader: SFTLoader, max_tokens: int | None = None):
        self._loader = loader
        self.names = ["sft"]
        tokens = np.cumsum([sum(len(loader._ids[i]) for i in row) for row in loader._val_rows])
        keep = len(tokens) if not max_tokens else max(1, int(np.searchsorted(tokens, max_tokens, side="right")))
        self._rows = loader._val_rows[:keep]
        self._tokens = int(tokens[keep - 1])

    def num_tokens(self) -> dict[str, int]:
        """Example tokens (not padding) read by one pass of `batches`."""
        return {"sft": self._tokens}

    def batches(self, source: int = 0):
        loader, rows = self._loader, self._rows
        for slots in rank_slots(len(rows), loader.batch_size, loader.rank, loader.world_size):
            yield loader._batch([rows[r] if r >= 0 else [] for r in slots])
