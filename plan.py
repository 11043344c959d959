"""Which plugin, micro batch and recomputation fit a model on your GPUs, and how long training will take.

  python plan.py -c 7b --gpus 8 --gpu_mem 80 -l 4096                # tables and a recommendation
  python plan.py -c 7b --gpus 8 --gpu_mem 80 --tokens 1e12 --mfu 0.45 --json
  python plan.py --grid                                              # 1b..70b x 1/8/64 GPUs x 40/80/141 GiB
  python plan.py --run_dir runs/xyz -c 1b -l 2048 --gpu H100        # TFLOPs and MFU of a finished run

Estimates only (training/planner.py): calibrate its constants against a measured peak (benchmark.py reports it).
"""
import argparse
import json
import sys

from model.config import LlamaConfig
from model.kernels import PRESET_NAMES
from training import planner
from training.args import add_recompute_flag, pinned_recomputation

GPU_BY_MEM_GIB = {40: "A100", 80: "H100", 141: "H200"}  # the usual GPU of each memory size, for its peak FLOPs
PHASES = {"loss backward": "loss bwd", "layer backward": "layer bwd", "optimizer step": "step"}
GRID_MODELS, GRID_GPUS, GRID_MEM_GIB = ("1b", "7b", "13b", "70b"), (1, 8, 64), (40, 80, 141)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default="7b", help="model size (tiny, 1b, 7b, 13b, 70b) or an HF config.json")
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs")
    p.add_argument("--gpu_mem", type=float, default=80, help="memory per GPU in GiB")
    p.add_argument("--gpu", default=None, help="GPU name for its peak FLOPs (default: by --gpu_mem: "
                   + ", ".join(f"{m} -> {g}" for m, g in GPU_BY_MEM_GIB.items()) + ", else H100)")
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--host_mem", type=float, default=None, help="host memory per node in GiB (default: not checked)")
    p.add_argument("-l", "--max_length", type=int, default=None,
                   help="sequence length (default: the config's max_position_embeddings)")
    p.add_argument("-b", "--batch_size", type=int, default=None,
                   help="micro batch per GPU (default: the recommendation chooses; the table uses its choice)")
    add_recompute_flag(p, "require recomputation: of every layer, or of the first LAYERS (of each pipeline stage)")
    p.add_argument("--global_batch_tokens", type=int, default=None, help="tokens per optimizer step over all GPUs")
    p.add_argument("--kernels", default="torch", choices=PRESET_NAMES,
                   help="kernel preset the run will use (default: torch; auto is assumed to find liger and flex)")
    p.add_argument("--attention_scope", choices=("document", "sequence"), default="document")
    p.add_argument("--tp", type=int, default=None, help="hybrid_parallel row: tensor parallel size")
    p.add_argument("--pp", type=int, default=None, help="hybrid_parallel row: pipeline parallel size")
    p.add_argument("--zero", type=int, default=None, choices=(0, 1, 2), help="hybrid_parallel row: ZeRO stage")
    p.add_argument("--tokens", type=float, default=None, help="token budget for the training-days estimate")
    p.add_argument("--mfu", type=float, default=None,
                   help=f"measured MFU for the days estimate (default: the plan's, from {planner.ASSUMED_MFU} assumed)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--grid", action="store_true", help="a markdown table of recommended plans for the README")
    p.add_argument("--run_dir", default=None, help="summarise a finished run's TensorBoard folder instead")
    return p


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    try:
        kernel_flags = planner.kernel_memory_flags(args.kernels, args.attention_scope)
    except ValueError as error:
        p.exit(2, f"error: --kernels {args.kernels}: {error}\n")
    if args.grid:
        print(grid(args, kernel_flags))
        return
    try:
        config = LlamaConfig.from_name(args.config)
    except ValueError as error:
        p.exit(2, f"error: -c {args.config}: {error}\n")
    seq_len = args.max_length or config.max_position_embeddings
    gpu = args.gpu or GPU_BY_MEM_GIB.get(round(args.gpu_mem), "H100")
    try:
        peak_flops = planner.peak_flops_for(gpu)
    except ValueError as error:
        p.exit(2, f"error: --gpu: {error}\n")
    if args.run_dir:
        summarize(args, config, seq_len, peak_flops)
        return
    try:
        report = plan_report(args, config, seq_len, gpu, peak_flops, kernel_flags)
    except ValueError as error:  # a layout the flags ask for that cannot exist (tp not dividing heads, ...)
        p.exit(2, f"error: {error}\n")
    print(json.dumps(report, indent=2) if args.json else render(report))


def plan_report(args, config, seq_len, gpu, peak_flops, kernel_flags) -> dict:
    """Everything the plan command shows, as plain values (the --json output)."""
    plan, does_not_fit = None, None
    try:
        plan = planner.recommend(
            config, n_gpus=args.gpus, gpu_mem_gib=args.gpu_mem, seq_len=seq_len,
            global_batch_tokens=args.global_batch_tokens, gpus_per_node=args.gpus_per_node,
            host_mem_gib=args.host_mem, micro_batch=args.batch_size,
            grad_checkpoint=pinned_recomputation(args.grad_checkpoint), **kernel_flags)
    except planner.DoesNotFit as error:
        does_not_fit = str(error)
    micro_batch = args.batch_size or (plan.micro_batch if plan else 1)
    rows = planner.memory_table(config, n_gpus=args.gpus, micro_batch=micro_batch, seq_len=seq_len,
                                gpu_mem_gib=args.gpu_mem, gpus_per_node=args.gpus_per_node,
                                tp=args.tp, pp=args.pp, zero=args.zero, **kernel_flags)
    report = {
        "model": config.name, "seq_len": seq_len, "gpus": args.gpus, "gpu_mem_gib": args.gpu_mem, "gpu": gpu,
        "peak_tflops": peak_flops / 1e12, "kernels": args.kernels, "attention_scope": args.attention_scope,
        "params": planner.param_counts(config), "micro_batch": micro_batch,
        "memory": [dict(row.to_dict(), fits=row.fits(args.gpu_mem, args.host_mem)) for row in rows],
        "recommendation": plan.to_dict() if plan else None, "does_not_fit": does_not_fit,
    }
    if args.tokens and plan:
        mfu = args.mfu or plan.expected_mfu
        report["training"] = {
            "tokens": args.tokens, "mfu": mfu, "mfu_source": "given" if args.mfu else "assumed",
            "days": planner.training_days(config, args.tokens, args.gpus, seq_len, mfu, peak_flops),
            "tokens_per_s": args.gpus * peak_flops * mfu / config.flops_per_token(seq_len),
        }
    return report


# ---- text output --------------------------------------------------------------------------------------------
def table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def recomputation(layers: int, layers_per_stage: int) -> str:
    """The table's recompute column: no, all, or how many of the layers (of each pipeline stage)."""
    if layers == 0:
        return "no"
    return "all" if layers == layers_per_stage else f"{layers} of {layers_per_stage}"


def millions(n: int) -> str:
    return f"{n / 1e6:,.1f}M" if n >= 1e5 else f"{n:,}"


def render(report: dict) -> str:
    params = report["params"]
    out = [f"{report['model']}: {params['total'] / 1e9:.2f}B parameters, sequence {report['seq_len']}, "
           f"{report['gpus']} x {report['gpu_mem_gib']:g} GiB ({report['gpu']}, {report['peak_tflops']:.0f} TFLOPs "
           f"bf16), kernels {report['kernels']}, {report['attention_scope']} attention", ""]
    layers = params["layers"] // max(1, params["layer"])
    out.append(table(["component", "parameters", "bf16 GiB"], [
        [name, millions(params[key]), f"{2 * params[key] / planner.GIB:.2f}"]
        for name, key in (("embedding", "embedding"), ("one layer", "layer"), (f"{layers} layers", "layers"),
                          ("final norm", "final_norm"), ("head", "head"), ("total", "total"))]))
    out += ["", f"Memory per GPU in GiB at micro batch {report['micro_batch']} x {report['seq_len']} "
                f"at the moment of the peak (allocated + {planner.FRAGMENTATION:.0%} allocator reserve and CUDA "
                f"context = total; fits: total within {1 - planner.HEADROOM:.0%} of {report['gpu_mem_gib']:g} GiB); "
                f"eval: forward only; host: CPU memory per node"]
    rows = []
    for row in report["memory"]:
        name = row["plugin"]
        if name == "hybrid_parallel":
            name += f" tp{row['tp']}xpp{row['pp']} z{row['zero']}"
        rows.append([name, recomputation(row["grad_checkpoint"], row["layers_per_stage"])]
                    + [f"{row[c]:.1f}" for c in planner.MemoryEstimate.COMPONENTS]
                    + [f"{row['total_gib']:.1f}", PHASES[row["peak_phase"]], f"{row['eval_gib']:.1f}",
                       f"{row['host_gib']:.0f}", "yes" if row["fits"] else "NO"])
    out.append(table(["plugin", "recompute", "params", "grads", "optim", "activ", "loss", "buffers", "overhead",
                      "total", "peak at", "eval", "host/node", "fits"], rows))
    out.append("")
    plan = report["recommendation"]
    if plan:
        out.append(f"Recommended: {' '.join(plan['flags'])}")
        out.append(f"  {plan['reason']}")
    else:
        out.append(f"Recommended: none. {report['does_not_fit']}")
    training = report.get("training")
    if training:
        out.append(f"\n{training['tokens']:.3g} tokens at MFU {training['mfu']:.2f} ({training['mfu_source']}): "
                   f"{training['days']:.1f} days on {report['gpus']} x {report['gpu']} "
                   f"({training['tokens_per_s']:,.0f} tokens/s)")
    return "\n".join(out)


def grid(args, kernel_flags) -> str:
    """Markdown: the recommended plan for each model x GPU count x GPU memory."""
    tokens = args.tokens or 1e12
    lines = [f"Recommended plans (`python plan.py --grid --kernels {args.kernels} --attention_scope "
             f"{args.attention_scope}`; sequence = the config's max_position_embeddings; days for {tokens:.3g} tokens "
             f"at the plan's assumed MFU on A100 (40 GiB) / H100 (80) / H200 (141)).", "",
             "| model | GPUs | GiB/GPU | plan | predicted GiB/GPU | host GiB/node | days |",
             "|---|---|---|---|---|---|---|"]
    for name in GRID_MODELS:
        config = LlamaConfig.from_name(name)
        seq_len = args.max_length or config.max_position_embeddings
        for gpus in GRID_GPUS:
            for mem in GRID_MEM_GIB:
                try:
                    plan = planner.recommend(config, n_gpus=gpus, gpu_mem_gib=mem, seq_len=seq_len,
                                             gpus_per_node=args.gpus_per_node, host_mem_gib=args.host_mem,
                                             **kernel_flags)
                except planner.DoesNotFit as error:
                    need = f"needs >= {error.min_gpus} GPUs" if error.min_gpus else "needs more than 8192 GPUs"
                    lines.append(f"| {name} | {gpus} | {mem} | does not fit: {need} | | | |")
                    continue
                days = planner.training_days(config, tokens, gpus, seq_len, plan.expected_mfu,
                                             planner.peak_flops_for(GPU_BY_MEM_GIB[mem]))
                lines.append(f"| {name} | {gpus} | {mem} | `{' '.join(plan.flags())}` | {plan.estimate.total_gib:.1f} "
                             f"| {plan.estimate.host_gib:.0f} | {days:,.1f} |")
    return "\n".join(lines)


def summarize(args, config, seq_len, peak_flops) -> None:
    try:
        summary = planner.summarize_run(args.run_dir, config, seq_len, peak_flops)
    except ValueError as error:
        sys.exit(f"error: --run_dir {error}")
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
        return
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)
    print(f"{args.run_dir}: {summary.steps} logged points after warm-up; "
          f"{fmt(summary.tokens_per_s_per_gpu, ',.0f')} tokens/s/GPU, "
          f"{fmt(summary.tflops_per_gpu, '.1f')} TFLOPs/GPU ({config.name}, sequence {seq_len}), "
          f"MFU {fmt(summary.mfu, '.1%')} (logged: {fmt(summary.logged_mfu, '.1%')}), "
          f"peak memory {fmt(summary.peak_mem_gib, '.1f')} GiB")


if __name__ == "__main__":
    main()
