"""Weighted sampling across sources, and the global sample order every rank slices its share from.

The order is global: slot g (0, 1, 2, ... over the whole run, all ranks together) draws its source from
`uniform(g)` against the weights, and takes that source's next sample in its shuffled stream. A step's
global batch is slots [position, position + batch_size * world_size); rank r reads the r-th block of
batch_size of them. So the state is the position and one counter per source, identical on every rank,
and resuming on another number of ranks is a different slicing of the same sequence.

Weights are by tokens: every sample is seq_len tokens, so drawing sources by weight draws tokens by weight.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from corpus.errors import DataError
from corpus.order import hash_ints, permute, uniform

log = logging.getLogger(__name__)

_MIX_TAG, _SHUFFLE_TAG = 0x6D6978, 0x736866


def parse_mixture(spec: str) -> list[tuple[str, float | None]]:
    """'a:0.7,b:0.3' -> [('a', 0.7), ('b', 0.3)]; 'a' -> [('a', None)]; 'a,b' -> both None (by tokens)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise DataError(f"data spec {spec!r} is empty; pass a path, a hub name or 'pathA:0.7,pathB:0.3'")
    out = []
    for part in parts:
        head, sep, tail = part.rpartition(":")
        try:
            weight = float(tail) if sep else None
        except ValueError:
            head, weight = part, None
        if weight is not None and (not math.isfinite(weight) or weight < 0):
            raise DataError(f"mixture weight {tail!r} in {spec!r} must be a non-negative number")
        out.append((head if weight is not None else part, weight))
    if len({w is None for _, w in out}) > 1:
        raise DataError(f"data spec {spec!r}: give every part a weight or none (e.g. 'a:0.7,b:0.3')")
    return out


class Schedule:
    """Which (source, sample) each global slot reads; the state of a loader.

    `samples[s]` is how many samples source s holds per epoch; source s's stream is its epochs back to back,
    each a fresh permutation of its samples keyed by (seed, s, epoch).
    """

    def __init__(self, names: list[str], samples: list[int], weights: list[float], seed: int):
        if len(names) != len(samples) or len(names) != len(weights):
            raise ValueError("names, samples and weights must have one entry per source")
        self.names, self.seed = list(names), int(seed)
        self.samples = np.asarray(samples, dtype=np.int64)
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self._cum = np.cumsum(self.weights)
        self._mix_key = hash_ints(self.seed, _MIX_TAG)
        self.position = 0                                     # global slots consumed
        self.consumed = np.zeros(len(names), dtype=np.int64)  # samples consumed per source

    @property
    def epoch(self) -> int:
        """Completed passes of the source that has been read furthest: 0 while no sample has repeated."""
        live = self.weights > 0
        return int((self.consumed[live] // self.samples[live]).max())

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Source and sample index of the next `n` global slots, and advance past them."""
        slots = np.arange(self.position, self.position + n, dtype=np.uint64)
        if len(self.names) == 1:
            src = np.zeros(n, dtype=np.int64)
        else:
            src = np.searchsorted(self._cum, uniform(slots, self._mix_key), side="right")
            src = np.minimum(src, len(self.names) - 1)
            src = np.where(self.weights[src] > 0, src, np.argmax(self.weights))  # float edge at the top
        stream = np.empty(n, dtype=np.int64)
        sample = np.empty(n, dtype=np.int64)
        for s in np.unique(src):
            mask = src == s
            stream[mask] = self.consumed[s] + np.arange(mask.sum())
            epochs, within = np.divmod(stream[mask], self.samples[s])
            out = np.empty(len(within), dtype=np.int64)
            for e in np.unique(epochs):
                sel = epochs == e
                out[sel] = permute(within[sel], int(self.samples[s]), hash_ints(self.seed, _SHUFFLE_TAG, s, e))
            sample[mask] = out
        self.consumed += np.bincount(src, minlength=len(self.names))
        self.position += n
        return src, sample

    def state_dict(self) -> dict:
        return {"seed": self.seed, "position": int(self.position), "sources": list(self.names),
                "weights": [float(w) for w in self.weights], "samples": [int(x) for x in self.samples],
                "consumed": [int(x) for x in self.consumed]}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise DataError(f"the data state was saved with seed {state['seed']}, this run has seed {self.seed}; "
                            f"pass --seed {state['seed']} to resume exactly")
        if list(state["sources"]) != self.names:
            raise DataError(f"the data state was saved with sources {state['sources']}, this run has "
                            f"{self.names}; resume with the same data spec")
        if [int(x) for x in state["samples"]] != self.samples.tolist():
            raise DataError(f"the data state was saved with {state['samples']} samples per source, this data has "
                            f"{self.samples.tolist()}: the prepared data or seq_len changed; resume with the same "
                            "prepared data and seq_len")
        if not np.allclose(state["weights"], self.weights, atol=1e-9):
            log.warning("mixture weights changed on resume: %s -> %s; samples from here on follow the new "
                        "weights", state["weights"], self.weights.tolist())
        self.position = int(state["position"])
        self.consumed = np.asarray(state["consumed"], dtype=np.int64)
