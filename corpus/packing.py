"""Token windows -> (input_ids, labels, position_ids), the batch format every loader returns.

Pretraining: documents (BOS text EOS) lie back to back in a token stream; sample k is the window of
seq_len + 1 tokens starting at k * seq_len, so windows overlap by one token and every token is a label
exactly once. Nothing is padded or filled: a stream's last partial window is left out.

    tokens     BOS a  b  EOS BOS c  d  e        (one window, seq_len = 7, plus one token to predict)
    input_ids  BOS a  b  EOS BOS c  d
    labels     a   b  EOS -100 c d  e           -100: the next token opens another document
    position   0   1  2  3   0   1  2           restarts at every document start (and at the window start)

Finetuning rows hold whole examples (or one, padded); the same rule gives -100 at the end of each.
"""
from __future__ import annotations

import bisect

import numpy as np

IGNORE = -100


def window_arrays(windows: np.ndarray, starts: np.ndarray,
                  targets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, T + 1) windows and (B, T + 1) document-start flags -> input_ids, labels, position_ids, each (B, T).

    `targets` (B, T + 1), when given, marks the tokens that may be labels (finetuning: responses only).
    """
    windows = np.asarray(windows, dtype=np.int64)
    starts = np.array(starts, dtype=bool)  # a copy: column 0 is set below
    B, T1 = windows.shape
    starts[:, 0] = True  # a window's first token starts a segment, wherever its document began
    t = np.arange(T1, dtype=np.int64)
    last_start = np.maximum.accumulate(np.where(starts, t, 0), axis=1)
    position_ids = (t - last_start)[:, :-1]
    keep = ~starts[:, 1:]
    if targets is not None:
        keep &= np.asarray(targets, dtype=bool)[:, 1:]
    labels = np.where(keep, windows[:, 1:], IGNORE)
    return np.ascontiguousarray(windows[:, :-1]), labels, np.ascontiguousarray(position_ids)


def pack_lengths(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: example indices grouped into rows of at most `capacity` tokens. Deterministic.

    Within a row, examples keep their input order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row id), sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the row capacity {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, r = free.pop(k)
            rows[r].append(i)
            space -= n
        else:
            r, space = len(rows), capacity - n
            rows.append([i])
        if space > 0:
            bisect.insort(free, (space, r))
    return [sorted(r) for r in rows]
