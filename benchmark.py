"""Throughput of the training step on synthetic tokens: the same step as pretrain.py, without data loading.

Prints one JSON line per run: tokens/s/GPU, MFU, TFLOPS/GPU (also under Colossal-AI's 8N convention), peak GPU
and host memory, the GPU's mean SM clock and power draw over the timed steps and its energy per token (rank 0's
GPU; millijoules per token it trained). `--baseline hf` then runs transformers' LlamaForCausalLM (SDPA) through the
same plugin, batch and loop in the same process, prints its line, and a last line with the suite's speedup over it,
the ratio of their energy per token (hf / suite: at the power limit it sets the speedup) and of their peak GPU
memory (suite / hf).
host_mem_gib is the process's peak, which cannot be reset, so the baseline's line leaves it out. `--repeats N`
measures N times (each line names its `repeat`); with the baseline the pairs alternate which model runs first, since
a GPU at its power limit slows as it warms up, and the speedup is the ratio of the two models' median tokens/s.
`--profile DIR` profiles a few steps (training/profiling.py); the JSON line's throughput then includes the
profiler's overhead.

  torchrun --nproc_per_node 1 benchmark.py -c 1b -p zero2 -b 8 -l 2048 --kernels auto --max_steps 20
  torchrun --nproc_per_node 1 benchmark.py -c 1b -p zero2 -b 8 -l 2048 --kernels auto --baseline hf
  torchrun --nproc_per_node 1 benchmark.py -c 1b -p zero2 -b 4 -l 2048 --kernels auto --baseline hf --repeats 3
  python -m training.batch_search --max_batch 32 -- -c 1b -p zero2 -l 2048    # the fastest micro batch
  torchrun --nproc_per_node 1 benchmark.py -c 1b -p zero2 -b 8 -l 2048 --kernels auto --profile runs/profile
"""
import argparse
import gc
import json
import statistics
from contextlib import nullcontext

import torch

from model.config import recomputed_layers
from training import args as flags
from training.baseline import build_hf_model, check_plugin, check_recomputation
from training.data import SyntheticLoader
from training.loop import Trainer
from training.plugins import data_parallel_rank
from training.profiling import check_steps, step_profiler
from training.setup import resolve_run, run_config

CLOCK_FIELDS = ("sm_clock_mhz", "sm_clock_max_mhz", "power_w", "power_limit_w")  # training/gpu_clock.py; None on CPU


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_model_flags(p, default_config="1b")
    flags.add_parallel_flags(p)
    flags.add_schedule_flags(p)
    flags.add_optimizer_flags(p, default_lr=3e-4)
    flags.add_output_flags(p)
    p.add_argument("--baseline", choices=("hf",), default=None,
                   help="also run transformers' LlamaForCausalLM (SDPA) the same way, and print the ratios")
    p.add_argument("--repeats", type=_at_least_one, default=1, metavar="N",
                   help="measure N times, alternating which model runs first with --baseline (default 1)")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="profile a few steps of the suite's run: Chrome traces in DIR, a table of the top kernels "
                        "and a GPU timeline summary (busy fraction, time per kernel kind and step phase, idle gaps)")
    p.set_defaults(max_steps=20, tensorboard_dir=None, attention_scope="sequence")
    return p


def main(argv=None) -> None:
    given = parser().parse_args(argv)
    if given.baseline == "hf":
        check_plugin(given.plugin)  # before resolve_run, whose checks would hide this under other refusals
    if given.profile:
        check_steps(given.max_steps)
        if given.repeats > 1:
            raise SystemExit("error: --profile traces one run; leave out --repeats")
    args, config, rank, world_size = resolve_run(parser(), argv)
    if args.baseline == "hf":
        check_recomputation(args.grad_checkpoint, config.num_hidden_layers)
    emit = _printer(rank)
    runs = {"suite": [], "hf": []}
    for repeat in range(1, args.repeats + 1):
        order = ("suite", "hf") if repeat % 2 else ("hf", "suite")
        for model_impl in order if args.baseline == "hf" else ("suite",):
            if runs["suite"] or runs["hf"]:
                _free_accelerator_memory()  # the last trainer is gone: this run starts from an empty GPU
            line = {**measure_model(args, config, rank, world_size, model_impl), "repeat": repeat}
            runs[model_impl].append(emit(line))
    if args.baseline == "hf":
        emit(speedup_line(runs["suite"], runs["hf"]))


def measure_model(args, config, rank: int, world_size: int, model_impl: str) -> dict:
    """One run of the suite's model, or of transformers' (model_impl "hf"), as measure() reports it."""
    if model_impl == "suite":
        return measure(args, config, rank, world_size, model_impl="suite", kernels=args.kernels)
    if rank == 0:
        print("baseline: transformers' LlamaForCausalLM, SDPA attention (the kernels named next are the suite's, "
              "unused here)", flush=True)
    hf = measure(args, config, rank, world_size, model_impl="hf", kernels="sdpa", model_builder=build_hf_model)
    hf["host_mem_gib"] = None  # the process's peak, the suite's runs included
    return hf


def speedup_line(suite_runs: list[dict], hf_runs: list[dict]) -> dict:
    """The suite's speedup over transformers' model (median tokens/s over median tokens/s), each pair's, the ratio
    of their energy per token (hf's median over the suite's) and of their peak GPU memory (the largest of each
    model's runs)."""
    def median(runs, key):
        values = [run[key] for run in runs if run.get(key) is not None]
        return statistics.median(values) if values else None

    line = {"baseline": "hf", "speedup": _ratio(median(suite_runs, "tokens_per_s_per_gpu"),
                                                median(hf_runs, "tokens_per_s_per_gpu"))}
    if len(suite_runs) > 1:
        line["speedups"] = [_ratio(suite["tokens_per_s_per_gpu"], hf["tokens_per_s_per_gpu"])
                            for suite, hf in zip(suite_runs, hf_runs)]
    line["energy_ratio"] = _ratio(median(hf_runs, "energy_mj_per_token"), median(suite_runs, "energy_mj_per_token"))
    peak = [max((run["peak_mem_gib"] for run in runs), default=0.0) for runs in (suite_runs, hf_runs)]
    return {**line, "memory_ratio": _ratio(*peak)}


def measure(args, config, rank: int, world_size: int, *, model_impl: str, kernels: str, model_builder=None) -> dict:
    """Train args.max_steps steps on synthetic tokens; the run's JSON fields. The trainer is freed on return."""
    data_rank, _ = data_parallel_rank(args, rank, world_size)  # hybrid_parallel: one stream per model replica
    loader = SyntheticLoader(config.vocab_size, args.max_length, args.batch_size, seed=args.seed + data_rank)
    trainer = Trainer(args, config, loader, rank=rank, world_size=world_size, total_steps=args.max_steps,
                      run_config=run_config(args, config, world_size), model_builder=model_builder)
    profiling = args.profile and model_impl == "suite"
    with step_profiler(args.profile, rank) if profiling else nullcontext() as profiler:
        if profiling:
            trainer.step_hooks.append(profiler.step)
        trainer.fit(save_at_end=False, save_on_preemption=False)
    if trainer.preempted:  # no line from a cut-short run, and no baseline after it: the signal asked to stop
        raise SystemExit(f"benchmark: {trainer.preempted.signal_name} at step {trainer.state.step} of "
                         f"{args.max_steps} ({model_impl} model): stopped without a result")
    summary = trainer.summary
    tokens_per_s = summary.get("tokens_per_s_per_gpu", 0.0)
    return {
        "model": config.name, "model_impl": model_impl, "params": config.num_params(), "plugin": args.plugin,
        "kernels": kernels,
        # which attention ran: `--kernels auto` takes flash_attn4 where flash-attn-4 is installed, else sdpa_cudnn;
        # the HF baseline's `kernels` name its attention, SDPA
        "attention": trainer.kernels.backend("attention") if model_impl == "suite" else kernels,
        "cuda_graphs": model_impl == "suite" and args.cuda_graphs,  # the layers replayed (model/cuda_graphs.py)
        "precision": args.mixed_precision, "gpus": world_size,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "micro_batch": args.batch_size, "seq_len": args.max_length, "grad_accum": trainer.accum,
        "grad_checkpoint": recomputed_layers(args.grad_checkpoint, config.num_hidden_layers),  # layers recomputed
        "steps": args.max_steps,
        "tokens_per_s_per_gpu": round(tokens_per_s, 1),
        "mfu": round(summary["mfu"], 4) if "mfu" in summary else None,
        "tflops_per_gpu": round(tokens_per_s * config.flops_per_token(args.max_length) / 1e12, 1),
        "tflops_per_gpu_8n": round(tokens_per_s * 8 * config.num_params() / 1e12, 1),
        "peak_mem_gib": round(summary["peak_mem_gib"], 2), "resident_mem_gib": round(summary["resident_mem_gib"], 2),
        "host_mem_gib": round(summary["host_mem_gib"], 2),
        # the GPU's mean SM clock and power over the timed steps: at its power limit a GPU slows its clock
        **{key: summary.get(key) for key in CLOCK_FIELDS},
        # None on a CPU, and on a board without an energy counter
        "energy_mj_per_token": (round(summary["energy_mj_per_token"], 3) if "energy_mj_per_token" in summary
                                else None),
    }


def _free_accelerator_memory() -> None:
    """Collect the finished run's model, optimizer and booster (their hooks hold reference cycles), hand the cached
    blocks back, and restart the peak that training/metrics.py reads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _printer(rank: int):
    """Print a result as one JSON line on rank 0, as soon as it is known; return it."""
    def emit(line: dict) -> dict:
        if rank == 0:
            print(json.dumps(line), flush=True)
        return line

    return emit


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    # None: not measured (no GPU memory or energy counter on a CPU)
    return round(numerator / denominator, 3) if numerator is not None and denominator else None


if __name__ == "__main__":
    main()
