"""The benchmark launch scripts (scripts/benchmark_*/PLUGIN_NxGPU.sh): each names as many GPUs as it launches,
passes flags benchmark.py accepts, and asks for a layout that the memory planner says fits the GPU in its name, so
that a user with that hardware does not find out by running out of memory."""
import re
from pathlib import Path

import pytest
from entry_points import ROOT

import benchmark
from model.config import LlamaConfig
from training import planner

SCRIPTS = sorted(ROOT.glob("scripts/benchmark_*/*.sh"))
GPU_MEM_GIB = {"A100": 80, "H100": 80, "H200": 141}
PLANNED = ("zero1", "zero2", "zero2_cpu", "gemini", "gemini_auto", "hybrid_parallel")  # ddp keeps no plan of its own


def launch(script: Path) -> tuple[int, int, str, list[str]]:
    """(GPUs in the name, processes per node, GPU kind, benchmark.py's flags) of a script's launch line."""
    total, kind = re.search(r"_(\d+)x(A100|H100|H200)\.sh$", script.name).groups()
    line = next(line for line in script.read_text().splitlines() if line.startswith("exec colossalai run"))
    nproc = int(re.search(r"--nproc_per_node (\d+)", line).group(1))
    flags = line.split("benchmark.py", 1)[1].replace('"$@"', "").split()
    return int(total), nproc, kind, flags


def test_there_are_scripts_for_each_size():
    assert {script.parent.name for script in SCRIPTS} == {"benchmark_1B", "benchmark_7B", "benchmark_70B"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: f"{s.parent.name}/{s.name}")
def test_script_launches_what_its_name_says_and_fits(script):
    total, nproc, kind, flags = launch(script)
    text = script.read_text()
    assert '"$@"' in text, "extra flags must pass through"
    if total > nproc:  # several nodes: the script cannot run without a hostfile
        assert total % nproc == 0 and "HOSTFILE:?" in text
    args = benchmark.parser().parse_args(flags)
    assert args.max_length and args.batch_size and args.plugin
    if args.plugin not in PLANNED:
        return
    round_tokens = args.batch_size * args.max_length * (total // (args.tp * args.pp))  # a micro-batch on each dp rank
    estimate = planner.estimate(
        LlamaConfig.from_name(args.config), plugin=args.plugin, n_gpus=total, micro_batch=args.batch_size,
        seq_len=args.max_length, grad_checkpoint=args.grad_checkpoint, tp=args.tp, pp=args.pp, zero=args.zero,
        gpus_per_node=nproc, offload_optim_frac=args.offload_optim_frac,
        grad_accum=max(1, (args.global_batch_tokens or 0) // round_tokens),
        **planner.kernel_memory_flags(args.kernels, args.attention_scope))
    usable = (1 - planner.HEADROOM) * GPU_MEM_GIB[kind]
    assert estimate.total_gib <= usable, f"planned {estimate.total_gib:.1f} GiB of {usable:.0f} usable on {kind}"
