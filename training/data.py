"""Batches for the loop: the corpus package's loaders on every rank, or synthetic tokens for benchmarks.

Tokenizing happens once, on rank 0, while the other ranks wait; every rank then reads the same shards.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist


def check_vocab(tokenizer, config, tokenizer_flag: str) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise SystemExit(
            f"error: tokenizer {tokenizer_flag} has {tokenizer.vocab_size} tokens, more than the model config "
            f"'{config.name}' embeds ({config.vocab_size}); use a larger config or a smaller tokenizer"
        )


def pretrain_loader(args: argparse.Namespace, tokenizer, rank: int, world_size: int):
    from corpus.errors import DataError
    from corpus.loader import PretrainLoader
    from corpus.prepare import prepare_dataset

    prepared, error = None, None
    if rank == 0:
        try:
            prepared = prepare_dataset(args.dataset, tokenizer, args.data_cache, workers=args.data_workers)
        except (DataError, FileNotFoundError) as e:
            error = e
    _barrier()
    if error is not None:  # rank 0 names the problem once; the others stop with it
        raise SystemExit(f"error: -d {args.dataset}: {error}")
    if rank != 0:
        prepared = prepare_dataset(args.dataset, tokenizer, args.data_cache, workers=1, progress=False)
    return PretrainLoader(prepared, seq_len=args.max_length, batch_size=args.batch_size, rank=rank,
                          world_size=world_size, seed=args.seed)


def steps_per_epoch(loader, world_size: int, grad_accum: int) -> int:
    """Optimizer steps in one pass over the corpus (over the sum of the sources for a mixture)."""
    return max(1, loader.samples_per_epoch // (loader.batch_size * world_size * grad_accum))


class SyntheticLoader:
    """Random tokens in the loop's batch format (plain causal rows), for throughput measurements."""

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, seed: int):
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.batches = 0

    def __iter__(self):
        while True:
            tokens = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len + 1), generator=self.generator)
            self.batches += 1
            yield {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = state["batches"]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
