"""`--profile DIR`: where a training step's time goes, from torch.profiler.

Profiles a few steps after the first ones (which pay for compilation, allocator growth and autotuning), writes a
Chrome trace per rank (open in chrome://tracing or https://ui.perfetto.dev) and prints, on rank 0, the operators
and kernels that took the most time on the GPU (on the CPU without one), then a timeline summary read back from the
trace: how much of the wall time the GPU was busy, GPU time per kind of kernel and per phase of the step
(`PHASES`, marked by the training loop), and the longest stretches the GPU sat idle, each with the phase it fell in
and the kernel that ended it. Idle GPU time is what the host costs: Python launch overhead and synchronisations.
"""
from __future__ import annotations

import bisect
import json
import re
from pathlib import Path

import torch

SKIPPED_STEPS = 3
PROFILED_STEPS = 3
TABLE_ROWS = 30


def step_profiler(folder: str, rank: int) -> torch.profiler.profile:
    """A profiler to enter around the loop and to step after every optimizer step (Trainer.step_hooks)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    Path(folder).mkdir(parents=True, exist_ok=True)

    def write(profiler: torch.profiler.profile) -> None:
        profiler.export_chrome_trace(str(Path(folder) / f"trace-rank{rank}.json"))
        if rank == 0:
            sort_by = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            print(f"profile of steps {SKIPPED_STEPS + 1}-{SKIPPED_STEPS + PROFILED_STEPS} (traces in {folder}):\n"
                  + profiler.key_averages().table(sort_by=sort_by, row_limit=TABLE_ROWS, max_name_column_width=80),
                  flush=True)
            summary = timeline_summary(Path(folder) / f"trace-rank{rank}.json")
            if summary is not None:
                print(format_timeline(summary, PROFILED_STEPS), flush=True)

    schedule = torch.profiler.schedule(wait=SKIPPED_STEPS - 1, warmup=1, active=PROFILED_STEPS, repeat=1)
    return torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=write)


# The ranges the training loop marks with record_function (training/loop.py), in step order.
FORWARD_BACKWARD, OPTIMIZER_STEP = "forward_backward", "optimizer_step"
PHASES = (FORWARD_BACKWARD, OPTIMIZER_STEP)

# Kernel kinds by name, first match wins: attention, cuBLAS/CUTLASS matmuls, collectives, the optimizer's fused
# kernels, Triton kernels (Liger's), then the rest of PyTorch's own. Attention comes first because FlashAttention-4's
# kernels are CUTLASS kernels by name ("kernel_cutlass_kernel_flash_attncute...").
KERNEL_KINDS = (
    ("attention", re.compile(r"fmha|flash|cudnn|attention|sdpa", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|cublas", re.I)),
    ("communication", re.compile(r"nccl", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam", re.I)),
    ("triton", re.compile(r"_kernel$|^triton", re.I)),
)
GPU_EVENT_KINDS = ("kernel", "gpu_memcpy", "gpu_memset")
TOP_GAPS = 8


def kernel_kind(event: dict) -> str:
    if event.get("cat") != "kernel":
        return "memcpy/memset"
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(event["name"])), "other")


def _union_length(intervals: list[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """Total length covered by (start, end) intervals, and the gaps between them, in time order."""
    covered, gaps, current_end = 0.0, [], None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                gaps.append((current_end, start))
            covered += end - start
            current_end = end
        elif end > current_end:
            covered += end - current_end
            current_end = end
    return covered, gaps


def timeline_summary(trace_path: str | Path) -> dict | None:
    """GPU busy time, time per kernel kind and per phase, and the longest idle gaps, from a Chrome trace of
    torch.profiler (times in ms). None when the trace holds no GPU work (a CPU run)."""
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_EVENT_KINDS and e.get("dur", 0) > 0]
    if not gpu:
        return None
    intervals = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in gpu]
    first, last = min(s for s, _ in intervals), max(e for _, e in intervals)
    busy, gaps = _union_length(intervals)
    by_kind: dict[str, float] = {}
    for event in gpu:
        kind = kernel_kind(event)
        by_kind[kind] = by_kind.get(kind, 0.0) + float(event["dur"])
    # The GPU-side spans of the loop's ranges (kineto projects record_function ranges onto the GPU timeline).
    phases = [(e["name"], float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events
              if e.get("cat") == "gpu_user_annotation" and e.get("name") in PHASES]

    def phase_at(time: float) -> str:
        return next((name for name, start, end in phases if start <= time < end), "between phases")

    per_phase: dict[str, dict[str, float]] = {}
    for name, start, end in phases:
        inside = [(max(s, start), min(e, end)) for s, e in intervals if e > start and s < end]
        phase_busy, _ = _union_length(inside)
        entry = per_phase.setdefault(name, {"wall_ms": 0.0, "busy_ms": 0.0})
        entry["wall_ms"] += (end - start) / 1e3
        entry["busy_ms"] += phase_busy / 1e3
    longest = sorted(gaps, key=lambda g: g[0] - g[1])[:TOP_GAPS]
    starts = sorted((float(e["ts"]), e["name"]) for e in gpu)
    start_times = [ts for ts, _ in starts]

    def kernel_after(time: float) -> str:  # the first GPU event to start at or after `time`
        index = bisect.bisect_left(start_times, time)
        return starts[index][1] if index < len(starts) else ""

    return {
        "wall_ms": (last - first) / 1e3, "busy_ms": busy / 1e3, "busy_fraction": busy / (last - first),
        "by_kind_ms": {k: v / 1e3 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "phases": per_phase,
        "longest_gaps": [{"ms": (end - start) / 1e3, "at_ms": (start - first) / 1e3,
                          "phase": phase_at((start + end) / 2), "next_kernel": kernel_after(end)[:80]}
                         for start, end in longest],
    }


def format_timeline(summary: dict, steps: int) -> str:
    lines = [f"GPU timeline over {steps} steps: {summary['wall_ms']:.1f} ms wall, busy {summary['busy_ms']:.1f} ms "
             f"({summary['busy_fraction']:.1%}); per step {summary['wall_ms'] / steps:.1f} ms wall, "
             f"{(summary['wall_ms'] - summary['busy_ms']) / steps:.1f} ms idle",
             "GPU time by kind (ms per step; streams overlap, so these can sum past the busy time): " + ", ".join(
                 f"{kind} {ms / steps:.1f}" for kind, ms in summary["by_kind_ms"].items())]
    for name, entry in summary["phases"].items():
        lines.append(f"phase {name}: {entry['wall_ms'] / steps:.1f} ms wall per step, GPU busy "
                     f"{entry['busy_ms'] / max(entry['wall_ms'], 1e-9):.1%}")
    for gap in summary["longest_gaps"]:
        lines.append(f"idle {gap['ms']:.2f} ms at {gap['at_ms']:.1f} ms ({gap['phase']}), then {gap['next_kernel']}")
    return "\n".join(lines)


def check_steps(max_steps: int) -> None:
    if max_steps < SKIPPED_STEPS + PROFILED_STEPS:
        raise SystemExit(f"error: --profile needs --max_steps {SKIPPED_STEPS + PROFILED_STEPS} or more (it skips "
                         f"{SKIPPED_STEPS} steps, then profiles {PROFILED_STEPS}), not {max_steps}")
