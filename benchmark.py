"""Throughput of the training step on synthetic tokens: the same step as pretrain.py, without data loading.

Prints one JSON line per run: tokens/s/GPU, MFU, TFLOPS/GPU (also under Colossal-AI's 8N convention),
peak GPU and host memory.

  torchrun --nproc_per_node 1 benchmark.py -c 1b -p zero2 -b 8 -l 2048 --kernels auto --max_steps 20
"""
import argparse
import json

import torch

from training import args as flags
from training.data import SyntheticLoader
from training.loop import Trainer
from training.plugins import data_parallel_rank
from training.setup import resolve_run, run_config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_model_flags(p, default_config="1b")
    flags.add_parallel_flags(p)
    flags.add_schedule_flags(p)
    flags.add_optimizer_flags(p, default_lr=3e-4)
    flags.add_output_flags(p)
    p.set_defaults(max_steps=20, tensorboard_dir=None, attention_scope="sequence")
    return p


def main(argv=None) -> None:
    args, config, rank, world_size = resolve_run(parser(), argv)
    data_rank, _ = data_parallel_rank(args, rank, world_size)  # hybrid_parallel: one stream per model replica
    loader = SyntheticLoader(config.vocab_size, args.max_length, args.batch_size, seed=args.seed + data_rank)
    trainer = Trainer(args, config, loader, rank=rank, world_size=world_size, total_steps=args.max_steps,
                      run_config=run_config(args, config, world_size))
    trainer.fit(save_at_end=False)
    summary = trainer.summary
    tokens_per_s = summary.get("tokens_per_s_per_gpu", 0.0)
    result = {
        "model": config.name, "params": config.num_params(), "plugin": args.plugin, "kernels": args.kernels,
        "precision": args.mixed_precision, "gpus": world_size,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "micro_batch": args.batch_size, "seq_len": args.max_length, "grad_accum": trainer.accum,
        "grad_checkpoint": args.grad_checkpoint, "steps": args.max_steps,
        "tokens_per_s_per_gpu": round(tokens_per_s, 1),
        "mfu": round(summary["mfu"], 4) if "mfu" in summary else None,
        "tflops_per_gpu": round(tokens_per_s * config.flops_per_token(args.max_length) / 1e12, 1),
        "tflops_per_gpu_8n": round(tokens_per_s * 8 * config.num_params() / 1e12, 1),
        "peak_mem_gib": round(summary["peak_mem_gib"], 2), "host_mem_gib": round(summary["host_mem_gib"], 2),
    }
    if rank == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
