"""Run a test function on several CPU processes joined by gloo, with what colossalai lacks on a CPU filled in (or,
with backend "nccl", on several GPUs).

colossalai's parallel layers, HybridParallelPlugin and pipeline schedules run on a CPU with gloo but for three
gaps of its CPU code paths, filled in only inside these test processes (with a GPU none of them is reached):
  - CpuAccelerator.get_rng_state passes a device to torch.get_rng_state, which takes none, and
    CpuAccelerator.manual_seed raises "not supported"; every parallel layer's constructor calls both.
  - The pipeline's p2p (colossalai/pipeline/p2p.py) asks torch.distributed.is_hccl_available() whenever NCCL is
    not available, and this torch has no such function.
tests/model/test_policy.py::test_colossalai_cpu_gaps shows each; when it fails, colossalai has fixed one: remove
its line in fill_cpu_gaps.
"""
import faulthandler
import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def fill_cpu_gaps() -> None:
    from colossalai.accelerator import CpuAccelerator

    CpuAccelerator.get_rng_state = lambda self, device=None: torch.get_rng_state()
    CpuAccelerator.manual_seed = lambda self, seed: torch.manual_seed(seed)
    if not hasattr(dist, "is_hccl_available"):
        dist.is_hccl_available = lambda: False


def accelerator_for_low_level_zero():
    """colossalai's CPU accelerator with what LowLevelZeroOptimizer asks of a GPU one: a GPU's name (its
    constructor refuses others), streams (none here; the reduction without overlap runs on the current one) and a
    synchronisation, both nothing on a CPU. Install it in a rank with colossalai.accelerator.set_accelerator."""
    from contextlib import nullcontext

    from colossalai.accelerator import CpuAccelerator

    class NoStreams(CpuAccelerator):
        name = "cuda"

        def Stream(self, device=None, priority=0, **kwargs):
            return None

        def current_stream(self, device=None):
            return None

        def stream(self, stream_):
            return nullcontext()

        def synchronize(self, device=None):
            pass

    return NoStreams()


def trained_low_level_zero(world_size: int, steps: int = 3, dtype=torch.bfloat16):
    """(model, optimizer): a small model of `dtype` trained a few steps by LowLevelZeroOptimizer in this rank (stage
    2 on several ranks: each holds a shard of every master weight), under accelerator_for_low_level_zero."""
    from colossalai.accelerator import set_accelerator
    from colossalai.zero.low_level.low_level_optim import LowLevelZeroOptimizer

    set_accelerator(accelerator_for_low_level_zero())
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.SiLU(), torch.nn.Linear(20, 6)).to(dtype)
    optimizer = LowLevelZeroOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), reduce_bucket_size=100,
                                      partition_grad=world_size > 1, overlap_communication=False)
    for _ in range(steps):
        optimizer.backward(model(torch.randn(5, 12, dtype=dtype)).float().square().mean())
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def run_on_ranks(fn, *args, world_size: int = 2, timeout_s: int = 300, backend: str = "gloo") -> None:
    """fn(rank, world_size, *args) in `world_size` processes; a failure on any rank fails the test with its trace.
    backend "nccl" joins GPUs instead (fn picks its device)."""
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    port = _free_port()
    processes = [context.Process(target=_worker, args=(rank, world_size, port, fn, args, errors, timeout_s, backend))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=timeout_s)
    for process in processes:
        if process.is_alive():  # a rank waiting forever on one that failed
            process.kill()
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not messages, "\n".join(messages)
    assert all(process.exitcode == 0 for process in processes), [process.exitcode for process in processes]


def _worker(rank, world_size, port, fn, args, errors, timeout_s, backend):
    faulthandler.dump_traceback_later(max(1, timeout_s - 10), exit=True)  # a hung rank says where it waits
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    fill_cpu_gaps()
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()
    # Every check passed: leave without the interpreter's teardown. After LowLevelZeroOptimizer at stage 2 on two
    # gloo ranks, one rank in about ten aborted there ("terminate called without an active exception", exit -6),
    # after its test had passed (tests/training/test_master_weights.py, on this 2-core CPU).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
