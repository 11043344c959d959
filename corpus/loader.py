"""The packed pretraining loader: prepared shards -> per-rank batches, with exact resume on any number of ranks.

    loader = PretrainLoader(prepared, seq_len=2048, batch_size=8, rank=rank, world_size=world, seed=42)
    for step, batch in zip(range(steps), loader):      # infinite: wraps into new, reshuffled epochs
        ...                                            # batch: input_ids, labels, position_ids, (8, 2048) int64
    state = loader.state_dict()                        # plain JSON values; the same on every rank
    loader.load_state_dict(state)                      # also on another world_size: no sample lost or repeated

Each source's samples are windows of its token stream (see corpus.packing); corpus.mixture decides which
source and sample each global slot reads. Reads are memory-mapped slices, the rest is vectorised numpy.
"""
from __future__ import annotations

import numpy as np
import torch

from corpus.errors import DataError
from corpus.mixture import Schedule
from corpus.packing import window_arrays
from corpus.shards import PreparedDataset

STATE_VERSION = 1


def check_ranks(batch_size: int, rank: int, world_size: int, seq_len: int) -> None:
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be positive")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


class PretrainLoader:
    def __init__(self, prepared: PreparedDataset, *, seq_len: int, batch_size: int, rank: int,
                 world_size: int, seed: int):
        check_ranks(batch_size, rank, world_size, seq_len)
        self.prepared, self.seq_len, self.batch_size = prepared, seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        sources = [s for s in prepared.sources if s.weight > 0]
        samples = [(s.num_tokens - 1) // seq_len for s in sources]
        for s, n in zip(sources, samples):
            if n == 0:
                raise DataError(f"source {s.name} ({s.folder}) has {s.num_tokens} tokens, fewer than one sample "
                                f"of seq_len + 1 = {seq_len + 1}; lower seq_len or add data")
        self.sources = sources
        self._streams = [s.open() for s in sources]
        self._schedule = Schedule([s.name for s in sources], samples, [s.weight for s in sources], seed)

    @property
    def epoch(self) -> int:
        """Completed passes over the source read furthest (see Schedule.epoch)."""
        return self._schedule.epoch

    @property
    def samples_per_epoch(self) -> int:
        """Samples (seq_len tokens each) in one pass over every source: the sum over sources."""
        return int(self._schedule.samples.sum())

    def tokens_seen_per_source(self) -> dict[str, int]:
        """Input tokens read so far by all ranks together, per source (the same on every rank)."""
        return {s.name: int(c) * self.seq_len for s, c in zip(self.sources, self._schedule.consumed)}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        src, sample = self._schedule.take(B * self.world_size)
        mine = slice(self.rank * B, (self.rank + 1) * B)
        windows = np.empty((B, T + 1), dtype=np.int64)
        starts = np.zeros((B, T + 1), dtype=bool)
        for b, (s, k) in enumerate(zip(src[mine], sample[mine])):
            stream, first = self._streams[s], int(k) * T
            windows[b] = stream.read(first, T + 1)
            starts[b, stream.doc_starts(first, first + T + 1) - first] = True
        input_ids, labels, position_ids = window_arrays(windows, starts)
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(position_ids)}

    def state_dict(self) -> dict:
        return {"kind": "pretrain", "version": STATE_VERSION, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "world_size": self.world_size, **self._schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "pretrain" or state.get("version") != STATE_VERSION:
            raise DataError(f"not a pretraining loader state (kind={state.get('kind')!r}, "
                            f"version={state.get('version')!r}); resume with the loader that saved it")
        if state["seq_len"] != self.seq_len:
            raise DataError(f"the data state was saved with seq_len {state['seq_len']}, this run has "
                            f"{self.seq_len}; resume with the same seq_len")
        self._schedule.load_state_dict(state)
