"""Counter-based randomness: every random choice is a pure function of (seed, counters), never a stateful RNG.

That is what makes resume exact on any number of ranks: the loader's whole state is a few integers.
`permute(i, n, key)` is a bijection of [0, n) (a Feistel network with cycle walking), so a shuffle of
300M samples needs no 2.4 GB permutation table; `uniform(i, key)` is a float in [0, 1) per counter value.
"""
from __future__ import annotations

import numpy as np

_M64 = (1 << 64) - 1


def hash_ints(*values: int) -> int:
    """A 64-bit key from a few non-negative integers (splitmix64 chained)."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = _splitmix_int((h ^ (int(v) & _M64)) & _M64)
    return h


def _splitmix_int(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of each element (uint64 in, uint64 out; wraps by design)."""
    z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniform(i: np.ndarray, key: int) -> np.ndarray:
    """A float64 in [0, 1) for each counter value in `i`, fixed by `key`."""
    bits = mix64(np.asarray(i, dtype=np.uint64) ^ np.uint64(key)) >> np.uint64(11)
    return bits.astype(np.float64) * (1.0 / (1 << 53))


def permute(i: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """The images of positions `i` (each in [0, n)) under a pseudo-random permutation of [0, n)."""
    i = np.asarray(i, dtype=np.uint64)
    if n <= 1:
        return np.zeros_like(i)
    half = max(1, (int(n - 1).bit_length() + 1) // 2)  # the Feistel domain 4**half is below 4 n
    mask = np.uint64((1 << half) - 1)
    keys = [np.uint64(hash_ints(key, r)) for r in range(rounds)]

    def feistel(x):
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            left, right = right, left ^ (mix64(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    out = feistel(i)
    outside = out >= np.uint64(n)
    while outside.any():  # cycle walking: a bijection of the domain restricted to [0, n)
        out[outside] = feistel(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64)
