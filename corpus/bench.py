"""How fast the packed loader delivers batches from prepared shards; prints one JSON line.

    python -m corpus.bench                                   # synthetic shards: 2 sources, 32M tokens
    python -m corpus.bench --data data/prepared/slim-3f2a... --seq_len 2048 --batch_size 8 --seconds 10

Only the loader is timed (reading, mixing, building the tensors), as nanoGPT's bench.py times only the step.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from corpus.loader import PretrainLoader
from corpus.shards import FORMAT, PreparedDataset, ShardWriter, token_dtype


def synthetic_shards(folder: str | os.PathLike, tokens: int, vocab_size: int = 32000, sources: int = 2,
                     shard_tokens: int = 1 << 23, seed: int = 0) -> Path:
    """A prepared folder of random documents (BOS ... EOS, mean length ~1,000) in `sources` slices."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = {"format": FORMAT, "spec": "synthetic", "name": "synthetic", "tokenizer": "synthetic",
             "vocab_size": vocab_size, "bos_id": 1, "eos_id": 2, "dtype": token_dtype(vocab_size).name,
             "exclude": [], "complete": False, "slices": {}, "progress": {}, "counts": {}}
    writer, rng = ShardWriter(folder, index), np.random.default_rng(seed)
    per_source = tokens // sources
    for s in range(sources):
        left = per_source
        while left > 0:
            n = min(left, shard_tokens)
            lengths = rng.geometric(1 / 1000, size=n // 200 + 8) + 2  # ~5 n tokens of documents: plenty
            ends = np.cumsum(lengths)
            k = int(np.searchsorted(ends, n))
            lengths = lengths[:k + 1]
            lengths[-1] -= ends[k] - n  # the last document ends with the shard
            toks = rng.integers(3, vocab_size, size=n, dtype=np.int64)
            starts = np.cumsum(lengths) - lengths
            toks[starts] = 1
            toks[np.cumsum(lengths) - 1] = 2
            writer.add(f"s{s}", toks, lengths)
            writer.commit()
            left -= n
    writer.commit(complete=True)
    return folder


def run(prepared: PreparedDataset, seq_len: int, batch_size: int, seconds: float, seed: int = 0) -> dict:
    loader = PretrainLoader(prepared, seq_len=seq_len, batch_size=batch_size, rank=0, world_size=1, seed=seed)
    next(loader)  # warm-up: opens the first shards
    batches, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            batch = next(loader)
        batches += 10
    elapsed = time.perf_counter() - t0
    assert batch["input_ids"].shape == (batch_size, seq_len)
    return {"tokens_per_s": round(batches * batch_size * seq_len / elapsed), "batches": batches,
            "seconds": round(elapsed, 3), "seq_len": seq_len, "batch_size": batch_size,
            "sources": len(prepared.sources), "tokens_in_data": prepared.num_tokens, "cpus": os.cpu_count()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m corpus.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="a prepared folder (default: synthetic shards in a temporary folder)")
    p.add_argument("--tokens", type=int, default=32 << 20, help="synthetic data size in tokens")
    p.add_argument("--sources", type=int, default=2, help="synthetic sources (a mixture when > 1)")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args(argv)
    if args.data:
        result = run(PreparedDataset.open(args.data), args.seq_len, args.batch_size, args.seconds)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            prepared = PreparedDataset.open(synthetic_shards(tmp, args.tokens, sources=args.sources))
            result = run(prepared, args.seq_len, args.batch_size, args.seconds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
