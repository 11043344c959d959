"""`--profile DIR`: where a training step's time goes, from torch.profiler.

Profiles a few steps after the first ones (which pay for compilation, allocator growth and autotuning), writes a
Chrome trace per rank (open in chrome://tracing or https://ui.perfetto.dev) and prints, on rank 0, the operators
and kernels that took the most time on the GPU (on the CPU without one).
"""
from __future__ import annotations

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

    schedule = torch.profiler.schedule(wait=SKIPPED_STEPS - 1, warmup=1, active=PROFILED_STEPS, repeat=1)
    return torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=write)


def check_steps(max_steps: int) -> None:
    if max_steps < SKIPPED_STEPS + PROFILED_STEPS:
        raise SystemExit(f"error: --profile needs --max_steps {SKIPPED_STEPS + PROFILED_STEPS} or more (it skips "
                         f"{SKIPPED_STEPS} steps, then profiles {PROFILED_STEPS}), not {max_steps}")
