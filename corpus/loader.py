"""The packed pretraining loader: prepared shards -> per-rank batches, with exact resume on any number of ranks.

    loader = PretrainLoader(prepared, seq_len=2048, batch_size=8, rank=rank, world_size=world, seed=42)
    for step, batch in zip(range(steps), loader):      # infinite: wraps into new, reshuffled epochs
        ...                                            # batch: input_ids, labels, position_ids, (8, 2048) int64
    state = loader.state_dict()                        # plain JSON values; the same on every rank
    loader.load_state_dict(state)                      # also on another world_size: no sample lost or repeated

Each source's samples are windows of its token stream (see corpus.packing); corpus.mixture decides which
source and sample each global slot reads. Reads are memory-mapped slices, the rest is vectorised numpy.

Validation data is held out by construction: with `held_out=f`, the last fraction f of every source's stream,
from the start of the document it cuts through (`held_out_start`), is never a training sample; `HeldOutReader`
reads only that tail, in a fixed order. So no token and no document is in both, on any number of ranks.

    train = PretrainLoader(prepared, ..., held_out=0.01)
    val = HeldOutReader(prepared, seq_len=2048, batch_size=8, rank=rank, world_size=world, held_out=0.01,
                        max_tokens=2**20)
    for s, name in enumerate(val.names):
        for batch in val.batches(s): ...             # as many batches on every rank; padding rows all -100
"""
from __future__ import annotations

import numpy as np
import torch

from corpus.errors import DataError
from corpus.mixture import Schedule
from corpus.packing import IGNORE, window_arrays
from corpus.shards import PreparedDataset, TokenStream

STATE_VERSION = 1


def check_ranks(batch_size: int, rank: int, world_size: int, seq_len: int) -> None:
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be positive")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


def check_held_out(held_out: float) -> None:
    if not 0 <= held_out < 1:
        raise ValueError(f"held_out ({held_out}) must be a fraction in [0, 1)")


def held_out_start(stream: TokenStream, held_out: float) -> int:
    """Stream offset where the held-out tail of a source begins (num_tokens when nothing is held out).

    The tail is the last `held_out` of the tokens, extended back to the start of the document it cuts through, so
    that no document is split between training and validation and at least the fraction asked for is held out.
    Where that document is the first, the tail starts at the next document instead; a source of one document is
    split at the fraction.
    """
    if held_out <= 0:
        return stream.num_tokens
    nominal = int(stream.num_tokens * (1 - held_out))
    if nominal <= 0:
        return 0
    before = stream.doc_starts(0, nominal + 1)
    if before[-1] > 0:
        return int(before[-1])
    after = stream.doc_starts(nominal, stream.num_tokens)
    return int(after[0]) if len(after) else nominal


class PretrainLoader:
    def __init__(self, prepared: PreparedDataset, *, seq_len: int, batch_size: int, rank: int,
                 world_size: int, seed: int, held_out: float = 0.0):
        check_ranks(batch_size, rank, world_size, seq_len)
        check_held_out(held_out)
        self.prepared, self.seq_len, self.batch_size = prepared, seq_len, batch_size
        self.rank, self.world_size, self.held_out = rank, world_size, float(held_out)
        sources = [s for s in prepared.sources if s.weight > 0]
        self._streams = [s.open() for s in sources]
        # training windows end before the held-out tail: sample k reads tokens [k T, k T + T] < held_out_start
        samples = [(held_out_start(stream, held_out) - 1) // seq_len for stream in self._streams]
        for s, n in zip(sources, samples):
            if n <= 0:
                kept = f" ({held_out:.1%} held out for validation)" if held_out else ""
                raise DataError(f"source {s.name} ({s.folder}) has {s.num_tokens} tokens{kept}, fewer than one "
                                f"sample of seq_len + 1 = {seq_len + 1}; lower seq_len or add data")
        self.sources = sources
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
        return {"kind": "pretrain", "version": STATE_VERSION, "seq_len": self.seq_len, "held_out": self.held_out,
                "batch_size": self.batch_size, "world_size": self.world_size, **self._schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        check_saved_state(state, kind="pretrain", settings={"seq_len": self.seq_len}, held_out=self.held_out,
                          held_out_of="each source")
        self._schedule.load_state_dict(state)


def check_saved_state(state: dict, *, kind: str, settings: dict, held_out: float, held_out_of: str) -> None:
    """One clear DataError when a loader's saved state is another kind of loader's, or was saved with other
    settings (e.g. seq_len) or another held-out fraction than this run's; the schedule checks the rest."""
    if state.get("kind") != kind or state.get("version") != STATE_VERSION:
        raise DataError(f"not a {kind} loader state (kind={state.get('kind')!r}, version={state.get('version')!r}); "
                        "resume with the loader that saved it")
    saved = {name: state[name] for name in settings}
    if saved != settings:
        def listed(values):
            return ", ".join(f"{name} {value}" for name, value in values.items())

        raise DataError(f"the data state was saved with {listed(saved)}, this run has {listed(settings)}; resume "
                        "with the same settings")
    saved_held_out = state.get("held_out", 0.0)  # states saved before validation existed held nothing out
    if saved_held_out != held_out:
        raise DataError(f"the data state was saved with {saved_held_out:.2%} of {held_out_of} held out for "
                        f"validation, this run holds out {held_out:.2%}; resume with the same --eval_fraction "
                        f"({saved_held_out:g})")


def rank_slots(n: int, batch_size: int, rank: int, world_size: int):
    """Global row indices of this rank's batches over n rows; -1 pads the last batch of each rank.

    Every rank gets ceil(n / (batch_size x world_size)) batches, so collective forwards stay in step.
    """
    per_step = batch_size * world_size
    for first in range(0, n, per_step):
        slots = first + rank * batch_size + np.arange(batch_size)
        yield np.where(slots < n, slots, -1)


class HeldOutReader:
    """Validation: the held-out tail of every source (see `held_out_start`), the same rows every time.

    held_out=1 reads whole sources (a dedicated validation set, e.g. SlimPajama's validation/ split). Per source,
    up to `max_tokens` tokens (None: all) in windows of seq_len + 1 spread evenly over the tail, in order, shared
    among ranks like training samples. Padding rows (to give every rank as many batches) are labelled -100.
    """

    def __init__(self, prepared: PreparedDataset, *, seq_len: int, batch_size: int, rank: int, world_size: int,
                 held_out: float, max_tokens: int | None = None):
        check_ranks(batch_size, rank, world_size, seq_len)
        if not 0 < held_out <= 1:
            raise ValueError(f"held_out ({held_out}) must be a fraction in (0, 1]")
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.names, self._streams, self._starts = [], [], []
        for source in (s for s in prepared.sources if s.weight > 0):
            stream = source.open()
            cut = held_out_start(stream, held_out)
            available = (stream.num_tokens - cut - 1) // seq_len
            if available <= 0:
                raise DataError(f"source {source.name} ({source.folder}): its held-out {held_out:.1%} has "
                                f"{stream.num_tokens - cut} tokens, fewer than one sample of seq_len + 1 = "
                                f"{seq_len + 1}; hold out a larger fraction or lower seq_len")
            take = available if not max_tokens else min(available, -(-max_tokens // seq_len))
            picks = np.arange(take, dtype=np.int64) * available // take  # evenly spread, increasing
            self.names.append(source.name)
            self._streams.append(stream)
            self._starts.append(cut + picks * seq_len)

    def num_tokens(self) -> dict[str, int]:
        """Input tokens read per source by one pass of `batches` over all ranks."""
        return {name: len(starts) * self.seq_len for name, starts in zip(self.names, self._starts)}

    def batches(self, source: int):
        """This rank's batches of one source, in a fixed order."""
        B, T = self.batch_size, self.seq_len
        stream, starts = self._streams[source], self._starts[source]
        for slots in rank_slots(len(starts), B, self.rank, self.world_size):
            windows = np.empty((B, T + 1), dtype=np.int64)
            doc_starts = np.zeros((B, T + 1), dtype=bool)
            for b, slot in enumerate(slots):
                first = int(starts[max(slot, 0)])
                windows[b] = stream.read(first, T + 1)
                doc_starts[b, stream.doc_starts(first, first + T + 1) - first] = True
            input_ids, labels, position_ids = window_arrays(windows, doc_starts)
            labels[slots < 0] = IGNORE
            yield {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                   "position_ids": torch.from_numpy(position_ids)}
