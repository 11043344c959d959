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
    from corpus.loader import PretrainLoader

    prepared = prepared_on_rank0(args.dataset, "-d", args, tokenizer)
    return PretrainLoader(prepared, seq_len=args.max_length, batch_size=args.batch_size, rank=rank,
                          world_size=world_size, seed=args.seed, held_out=getattr(args, "eval_fraction", 0.0))


def prepared_on_rank0(spec: str, flag: str, args: argparse.Namespace, tokenizer):
    """The PreparedDataset of a data spec, tokenized by rank 0 while the others wait; errors name `flag`.

    Rank 0 of all processes: the loaders' `rank` is the data-parallel one, which model-parallel ranks share.
    """
    from corpus.errors import DataError
    from corpus.prepare import prepare_dataset

    rank = dist.get_rank() if dist.is_initialized() else 0
    prepared, error = None, None
    if rank == 0:
        try:
            prepared = prepare_dataset(spec, tokenizer, args.data_cache, workers=args.data_workers)
        except (DataError, FileNotFoundError) as e:
            error = e
    _barrier()
    if error is not None:  # rank 0 names the problem once; the others stop with it
        raise SystemExit(f"error: {flag} {spec}: {error}")
    if rank != 0:
        prepared = prepare_dataset(spec, tokenizer, args.data_cache, workers=1, progress=False)
    return prepared


def held_out_reader(spec: str, flag: str, held_out: float, args: argparse.Namespace, tokenizer, rank: int,
                    world_size: int):
    """A validation reader over the held-out part of a corpus (held_out=1: all of it), --eval_tokens per source."""
    from corpus.errors import DataError
    from corpus.loader import HeldOutReader

    prepared = prepared_on_rank0(spec, flag, args, tokenizer)
    try:
        return HeldOutReader(prepared, seq_len=args.max_length, batch_size=args.batch_size, rank=rank,
                             world_size=world_size, held_out=held_out, max_tokens=args.eval_tokens or None)
    except DataError as error:
        raise SystemExit(f"error: {flag} {spec}: {error}") from None


def validation_reader(args: argparse.Namespace, tokenizer, rank: int, world_size: int):
    """pretrain.py's validation data: --eval_dataset whole, else the held-out --eval_fraction of -d; or None."""
    if not args.eval_interval:
        return None
    if args.eval_dataset:
        return held_out_reader(args.eval_dataset, "--eval_dataset", 1.0, args, tokenizer, rank, world_size)
    return held_out_reader(args.dataset, "-d", args.eval_fraction, args, tokenizer, rank, world_size)


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
