"""The fastest micro batch: benchmark.py at -b 1, 2, 4, ... until a run runs out of memory or --max_batch.

  python -m training.batch_search --nproc_per_node 8 --max_batch 32 -- -c 1b -p zero2 -l 2048 --kernels auto

Each size runs in its own torchrun launch (a clean GPU each time). Prints each run's JSON lines, then one line with
the best micro batch by tokens_per_s_per_gpu and the sizes tried. A failure other than out-of-memory stops the
search with the failing run's last lines and exit status 1.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmark.py"
OUT_OF_MEMORY = ("out of memory", "OutOfMemoryError")
TAIL_LINES = 30  # of a failed run's output, shown when it did not run out of memory


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc_per_node", type=int, default=1, help="processes (GPUs) per run")
    p.add_argument("--max_batch", type=int, default=64, help="the largest micro batch to try")
    p.add_argument("benchmark_flags", nargs=argparse.REMAINDER,
                   help="after --: benchmark.py's flags, without -b")
    return p


def run_benchmark(flags: list[str], nproc: int, batch: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(BENCHMARK), *flags, "-b", str(batch)]
    return subprocess.run(command, cwd=BENCHMARK.parent, capture_output=True, text=True)


def search(flags: list[str], nproc: int, max_batch: int, run=run_benchmark) -> tuple[dict, bool]:
    """(the summary line, whether the search ended cleanly). `run(flags, nproc, batch)` launches one size."""
    tried, tokens_per_s, stopped_by = [], {}, "max_batch"
    batch = 1
    while batch <= max_batch:
        tried.append(batch)
        result = run(flags, nproc, batch)
        lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode != 0 or not lines:
            stopped_by = _report_failure(batch, result)
            break
        for line in lines:
            print(json.dumps(line), flush=True)
        tokens_per_s[batch] = lines[0]["tokens_per_s_per_gpu"]  # the suite's (with --baseline, more lines follow)
        batch *= 2
    best = max(tokens_per_s, key=tokens_per_s.get) if tokens_per_s else None
    summary = {"best_micro_batch": best, "tokens_per_s_per_gpu": tokens_per_s.get(best), "tried": tried,
               "stopped_by": stopped_by}
    return summary, stopped_by != "error" and best is not None


def _report_failure(batch: int, result: subprocess.CompletedProcess) -> str:
    """Say why the run at this size failed; "out of memory" ends a search as expected, anything else is an error."""
    output = result.stdout + result.stderr
    if any(marker in output for marker in OUT_OF_MEMORY):
        print(f"micro batch {batch}: out of memory; stopping", file=sys.stderr, flush=True)
        return "out of memory"
    tail = "\n".join(output.splitlines()[-TAIL_LINES:])
    print(f"micro batch {batch}: failed (exit status {result.returncode}); its last lines:\n{tail}", file=sys.stderr,
          flush=True)
    return "error"


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    flags = args.benchmark_flags[1:] if args.benchmark_flags[:1] == ["--"] else args.benchmark_flags
    if any(_sets_batch(flag) for flag in flags):
        raise SystemExit("error: the search sets -b itself: leave -b/--batch_size out of benchmark.py's flags")
    if args.max_batch < 1 or args.nproc_per_node < 1:
        raise SystemExit("error: --max_batch and --nproc_per_node must be at least 1")
    summary, clean = search(flags, args.nproc_per_node, args.max_batch)
    print(json.dumps(summary), flush=True)
    if not clean:
        raise SystemExit(1)


def _sets_batch(flag: str) -> bool:
    """-b, -b8, --batch_size=8, or an abbreviation argparse would take for it (--bat)."""
    name = flag.split("=")[0]
    return (name.startswith("-b") and not name.startswith("--")) or (len(name) > 4 and "--batch_size".startswith(name))


if __name__ == "__main__":
    main()
