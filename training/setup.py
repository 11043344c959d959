"""What every entry point does before training: parse, fill defaults, check, join the process group."""
from __future__ import annotations

import argparse
import dataclasses
import platform

import torch

from model.config import LlamaConfig

from . import args as flags
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
    rank, world_size = init_distributed(args.seed)
    return args, config, rank, world_size


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
