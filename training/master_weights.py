"""The float32 master weights that the optimizer steps, saved beside a checkpoint so that a resumed run continues
exactly where it stopped.

Under bf16 or fp16 the ZeRO, Gemini and hybrid-parallel optimizers keep a float32 copy of every weight and step that
copy; the model's own weights are its rounding to 16 bits. colossalai 0.5.0's checkpoints hold the rounded weights
and the optimizer's moments, but not the float32 copy: on load, LowLevelZero and hybrid_parallel rebuild it from the
rounded weights (`update_master_params`), and Gemini's float32 chunks come back without their low bits too. The
resumed run's first step is the same, and from its second the runs drift apart (the tiny model's loss by 1e-3 at
the second step after the resume and 5e-3 at the fourth, under zero2, zero2_cpu and gemini alike;
tests/training/test_resume_gpu.py). Each rank here writes its part of the float32
copy (its shards, in the optimizer's own layout) to `master/rank-R-S.safetensors`, and after colossalai's load
copies them back, when the run resumes in the layout it was saved in. In another layout (more or fewer GPUs, other
chunks) the copy rebuilt from the rounded weights stays, and the run says so.
"""
from __future__ import annotations

from pathlib import Path

import torch

SHARD_BYTES = 2 << 30  # files of about 2 GiB: saving holds no more than that of them on the host at a time


def master_weights(model, optimizer) -> dict[str, torch.Tensor]:
    """This rank's float32 master weights by names that find them again in the same layout (parameter names; Gemini:
    its chunks, each named by its index and first parameter). Empty when the optimizer steps the weights themselves
    (DDP, or training in float32)."""
    if hasattr(model, "chunk_manager"):  # Gemini: the float32 chunk beside each 16-bit one, this rank's part of it
        masters, seen = {}, set()
        for param in model.fp16_params:
            master = model.chunk_manager.get_chunk(param).paired_chunk
            if master is not None and id(master) not in seen:
                seen.add(id(master))
                masters[f"chunk{len(seen) - 1:05d}.{model.param2name[param]}"] = master.payload
        return masters
    if hasattr(optimizer, "working_to_master_param"):  # LowLevelZero, and hybrid_parallel under --zero 1 or 2
        by_id = optimizer.working_to_master_param
    elif hasattr(optimizer, "working_to_master_map"):  # hybrid_parallel's mixed precision without ZeRO
        by_id = {id(working): master for working, master in optimizer.working_to_master_map.items()}
    else:
        return {}
    named = model.unwrap().named_parameters() if hasattr(model, "unwrap") else model.named_parameters()
    return {name: by_id[id(param)] for name, param in named
            if id(param) in by_id and by_id[id(param)].dtype != param.dtype}


def save(folder: Path, rank: int, model, optimizer) -> None:
    """Write this rank's master weights under `folder` in files of about SHARD_BYTES (nothing when there are none)."""
    from safetensors.torch import save_file

    masters = master_weights(model, optimizer)
    if not masters:
        return
    folder.mkdir(parents=True, exist_ok=True)
    shard, shard_bytes, index = {}, 0, 0
    for position, (name, master) in enumerate(masters.items()):
        shard[name] = master.detach().to("cpu", copy=True).contiguous()
        shard_bytes += master.numel() * master.element_size()
        if shard_bytes >= SHARD_BYTES or position == len(masters) - 1:
            save_file(shard, str(folder / f"rank-{rank:05d}-{index:05d}.safetensors"))
            shard, shard_bytes, index = {}, 0, index + 1


def restore(folder: Path, rank: int, model, optimizer) -> str | None:
    """Copy this rank's saved master weights back over those colossalai rebuilt from the rounded weights; every rank
    does, or none (a collective: call it on every rank). Returns why not (the rebuilt copy then stays), or None when
    they were restored or there are none to restore."""
    masters = master_weights(model, optimizer)
    saved, why_not = _saved_for(folder, rank, masters)
    # all ranks or none: replicas that hold the same weights (data parallel without ZeRO) must not drift apart
    if not _every_rank_agrees(why_not is None):
        return why_not or "another rank's master weights were saved in another layout"
    with torch.no_grad():
        for name, master in masters.items():
            master.copy_(saved[name].get_tensor(name))
    return None


def _saved_for(folder: Path, rank: int, masters: dict[str, torch.Tensor]):
    """({name: the open file holding it}, None) when `folder` holds exactly these master weights for `rank`, else
    (None, why not). Nothing to restore counts as holding them."""
    from safetensors import safe_open

    if not masters:
        return {}, None
    files = sorted(folder.glob(f"rank-{rank:05d}-*.safetensors"))
    if not files:
        return None, f"the checkpoint has no float32 master weights for rank {rank} ({folder})"
    saved = {name: handle for handle in (safe_open(str(path), framework="pt") for path in files)
             for name in handle.keys()}
    if saved.keys() != masters.keys():
        return None, (f"{folder} holds the master weights of another layout ({len(saved)} tensors for rank {rank}, "
                      f"this run has {len(masters)})")
    for name, master in masters.items():
        if list(saved[name].get_slice(name).get_shape()) != list(master.shape):
            return None, f"{folder} holds the master weights of another layout (the shape of {name} differs)"
    return saved, None


def _every_rank_agrees(ok: bool) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ok
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
