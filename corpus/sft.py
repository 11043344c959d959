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
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from corpus.errors import DataError
from corpus.loader import STATE_VERSION, check_ranks
from corpus.mixture import Schedule
from corpus.packing import pack_lengths, window_arrays
from corpus.sources import BadLine, json_records

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
_SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst", ".jsonl.gz", ".json.gz")


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
                 on_bad_line: str = "skip"):
        check_ranks(batch_size, rank, world_size, seq_len)
        if on_bad_line not in ("skip", "error"):
            raise ValueError(f"on_bad_line must be 'skip' or 'error', not {on_bad_line!r}")
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.pack, self.pad_id = pack, tokenizer.pad_id
        self.stats = {"examples": 0, "truncated": 0, "dropped": 0, "bad_lines": 0}
        self._ids, self._targets = self._load(_files(path_or_paths), tokenizer, on_bad_line)
        lengths = [len(x) for x in self._ids]
        self._rows = pack_lengths(lengths, seq_len) if pack else [[i] for i in range(len(lengths))]
        self._row_tokens = np.array([sum(lengths[i] for i in r) for r in self._rows], dtype=np.int64)
        fill = float(self._row_tokens.sum()) / (len(self._rows) * seq_len)
        self.stats.update(rows=len(self._rows), fill=round(fill, 4))
        self._schedule = Schedule(["sft"], [len(self._rows)], [1.0], seed)
        self._tokens_seen = 0

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
        out_ids, out_targets = [], []
        for i, (x, t) in enumerate(zip(ids, targets)):
            if len(x) > self.seq_len:
                self.stats["truncated"] += 1
                x, t = x[: self.seq_len], t[: self.seq_len]
            if not any(t[1:]):
                self.stats["dropped"] += 1
                continue
            out_ids.append(np.asarray(x, dtype=np.int64))
            out_targets.append(np.asarray(t, dtype=bool))
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
        return out_ids, out_targets

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
        B, T = self.batch_size, self.seq_len
        _, rows = self._schedule.take(B * self.world_size)
        self._tokens_seen += int(self._row_tokens[rows].sum())
        windows = np.full((B, T + 1), self.pad_id, dtype=np.int64)
        starts = np.zeros((B, T + 1), dtype=bool)
        targets = np.zeros((B, T + 1), dtype=bool)
        for b, r in enumerate(rows[self.rank * B:(self.rank + 1) * B]):
            pos = 0
            for i in self._rows[r]:
                n = len(self._ids[i])
                windows[b, pos:pos + n] = self._ids[i]
                targets[b, pos:pos + n] = self._targets[i]
                starts[b, pos] = True
                pos += n
            starts[b, pos] = True  # padding is a segment of its own (pos <= T: column T is always padding)
        input_ids, labels, position_ids = window_arrays(windows, starts, targets)
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(position_ids)}

    def state_dict(self) -> dict:
        return {"kind": "sft", "version": STATE_VERSION, "seq_len": self.seq_len, "pack": self.pack,
                "batch_size": self.batch_size, "world_size": self.world_size, "tokens_seen": self._tokens_seen,
                **self._schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "sft" or state.get("version") != STATE_VERSION:
            raise DataError(f"not a finetuning loader state (kind={state.get('kind')!r}); resume with the "
                            "loader that saved it")
        if state["seq_len"] != self.seq_len or state["pack"] != self.pack:
            raise DataError(f"the data state was saved with seq_len {state['seq_len']}, pack {state['pack']}; "
                            f"this run has {self.seq_len}, {self.pack}: resume with the same settings")
        self._schedule.load_state_dict(state)
        self._tokens_seen = int(state["tokens_seen"])
