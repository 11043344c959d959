"""What every entry point does before training: parse, fill defaults, check, join the process group."""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform

import torch

from model.config import LlamaConfig

from . import args as flags
from .planner import RECOMMEND_ORDER
from .loop import init_distributed


def resolve_run(parser: argparse.ArgumentParser, argv=None, config_from=None):
    """Parsed and validated flags, the model config and this process's (rank, world size).

    `config_from(args)` supplies the config spec for entry points without -c (finetune: the weights' folder).
    """
    args = flags.apply_defaults(parser.parse_args(argv))
    if config_from is not None:
        args.config = config_from(args)
    flags.validate(args)
    try:
        config = LlamaConfig.from_name(args.config)
    except ValueError as error:
        raise SystemExit(f"error: -c {args.config}: {error}") from None
    if args.max_length is None:
        args.max_length = config.max_position_embeddings
    flags.check_recomputed_layers(args.grad_checkpoint, config.num_hidden_layers)
    rank, world_size = init_distributed(args.seed)
    if args.plugin == "auto":
        plan_automatically(args, config, world_size, rank)
        flags.validate(args)
    return args, config, rank, world_size


# What -p auto chooses among, in the planner's order: all it recommends but hybrid_parallel, which runs only with
# the --tp/--pp layout given on the command line.
AUTO_PLUGINS = tuple(plugin for plugin in RECOMMEND_ORDER if plugin != "hybrid_parallel")


def plan_automatically(args: argparse.Namespace, config: LlamaConfig, world_size: int, rank: int) -> None:
    """-p auto: let the memory planner choose the plugin, micro batch and recomputation, and say why."""
    from .planner import DoesNotFit, kernel_memory_flags, recommend

    if not torch.cuda.is_available():
        args.plugin = "ddp"
        args.batch_size = args.batch_size or 4
        _print_on(rank, "-p auto: no GPU, so -p ddp")
        return
    import psutil

    try:
        plan = recommend(
            config, n_gpus=world_size, gpu_mem_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
            seq_len=args.max_length, global_batch_tokens=args.global_batch_tokens,
            gpus_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
            host_mem_gib=psutil.virtual_memory().total / 2**30, plugins=AUTO_PLUGINS, micro_batch=args.batch_size,
            grad_checkpoint=flags.pinned_recomputation(args.grad_checkpoint),
            **kernel_memory_flags(args.kernels, args.attention_scope))
    except DoesNotFit as error:
        raise SystemExit(f"error: -p auto: {error}") from None
    args.plugin, args.batch_size, args.grad_checkpoint = plan.plugin, plan.micro_batch, plan.grad_checkpoint
    args.offload_optim_frac = plan.offload_optim_frac
    _print_on(rank, f"-p auto chose {' '.join(plan.flags())}: {plan.reason}")


def _print_on(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


def load_checked_tokenizer(spec: str, config: LlamaConfig):
    """The tokenizer for --tokenizer SPEC, refused with one clear line if missing or larger than the model's vocab."""
    from corpus.tokenizer import load_tokenizer

    from .data import check_vocab

    try:
        tokenizer = load_tokenizer(spec)
    except (ValueError, OSError) as error:
        raise SystemExit(f"error: --tokenizer {spec}: {error}") from None
    check_vocab(tokenizer, config, spec)
    return tokenizer


def run_config(args: argparse.Namespace, config: LlamaConfig, world_size: int, **extra) -> dict:
    """The run's whole configuration, saved beside every checkpoint so runs can be reproduced and diffed."""
    import colossalai

    return {
        "args": vars(args),
        "model": dataclasses.asdict(config),
        "world_size": world_size,
        "versions": {"torch": torch.__version__, "colossalai": colossalai.__version__,
                     "python": platform.python_version()},
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        **extra,
    }
