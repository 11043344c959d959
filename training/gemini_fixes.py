"""Costs colossalai 0.5.0's Gemini pays in every micro-batch's backward, removed at the narrowest point.

Gemini reduces a chunk's gradients as soon as the backward has produced all of them, once per micro-batch. For each
chunk it then
1. records the chunk's gradient norm for clipping with `.item()` (`Chunk.set_l2_norm`): a host synchronisation per
   chunk, about 24 per micro-batch for the 1b model. Each one drains the GPU's queue, so Gemini's Python work between
   kernels stops overlapping the GPU: a profile of -p gemini (1b, one H100, micro batch 16 x 4) showed the GPU idle
   for 67 ms of every 480 ms micro-batch, against 4 ms under -p zero2.
2. checks the gradients for inf and NaN (`Chunk.has_inf_or_nan`), about five passes over every gradient. Only the
   fp16 loss scaler reads the result; under bf16 nothing does.
3. with gradient accumulation, starts the next micro-batch by copying the accumulated gradients out of the reduced
   shard and back into a zeroed chunk (`ChunkManager.rearrange_accumulated_grad_chunk`): a clone, a multiplication
   by the number of ranks, a zero fill and an addition, where one multiplication into place gives the same bits.

4. after every backward (`GeminiDDP._post_backward`), logs Gemini's timings with `DistributedLogger.debug`, which
   builds its message's prefix from `inspect.stack()` before it asks whether DEBUG is enabled (it is not, by
   default). `inspect.stack()` looks up every frame's module among all those imported and reads its source line: a
   profile of -p gemini (1b, one H100, micro batch 1 x 128, FlashAttention-4 and transformers imported) put 173 ms of
   host time in each call, 128 calls in 22.1 of 114 s. At micro batch 4 x 2048 the host then runs behind the GPU:
   35,729 tokens/s at 455 W, against 78,110 under -p zero2 on another H100 of the same kind.

Without the `.item()` in 1, nothing held the host while colossalai's reduction stream still read memory it had
already freed, so the backward's stream now waits for that stream after each gradient (`GeminiDDP.grad_handle`).

Each replacement computes the same values (tests/training/test_gemini_fixes.py): the norm stays on the GPU as a
float64 tensor until the optimizer step adds the chunks' norms up (`GeminiOptimizer._calc_global_norm` takes
`math.sqrt` of the sum, one synchronisation per step). tests/training/test_colossalai_workarounds.py shows the
synchronisation in colossalai's own method; drop the matching patch when that test fails.
"""
from __future__ import annotations

import logging
import sys

import torch

from .colossalai_patches import own_attribute, replace_attributes

ORIGINALS: dict = {}  # (class, attribute) -> colossalai's own, kept by apply() for the tests' comparisons
_colossalai_grad_handle = None  # GeminiDDP.grad_handle's function, bound once by apply(): it runs per gradient


def apply() -> None:
    """Install the five replacements on colossalai's GeminiDDP, Chunk, ChunkManager and DistributedLogger classes
    (once; later calls do nothing)."""
    global _colossalai_grad_handle
    from colossalai.logging import DistributedLogger
    from colossalai.zero.gemini.chunk import Chunk, ChunkManager
    from colossalai.zero.gemini.gemini_ddp import GeminiDDP

    if ORIGINALS:
        return
    replace_attributes({
        (GeminiDDP, "grad_handle"): staticmethod(grad_handle_then_wait_for_its_stream),
        (Chunk, "set_l2_norm"): set_l2_norm_on_gpu,
        (Chunk, "has_inf_or_nan"): property(has_inf_or_nan_unless_bf16),
        (ChunkManager, "rearrange_accumulated_grad_chunk"): rearrange_accumulated_grad_chunk_in_place,
        (DistributedLogger, "debug"): debug_only_when_enabled,
    }, ORIGINALS)
    _colossalai_grad_handle = ORIGINALS[GeminiDDP, "grad_handle"].__func__


def colossalais_own(cls, name: str):
    """colossalai's attribute `name` of `cls` as it was before apply() (class-level: a function or a property)."""
    return own_attribute(ORIGINALS, cls, name)


def grad_handle_then_wait_for_its_stream(grad, *args, async_reduce_stream=None, **kwargs):
    """GeminiDDP.grad_handle, then the backward's stream waits for the reduction stream's work.

    colossalai reduces a finished chunk on its own stream and frees chunk memory there (the gathered gradients, the
    gathered parameters) while that stream may still be reading it. The freed blocks go back to the backward's stream,
    which may reuse them at once. Its `.item()` in set_l2_norm used to hold the host until the reduction finished;
    without it, the next allocations could overwrite memory still being reduced (seen as a NaN loss from the second
    step: 7b on two H200s with --gemini_prefetch 4). Making the backward's stream wait orders every later kernel after
    the reduction, without stalling the host.
    """
    result = _colossalai_grad_handle(grad, *args, async_reduce_stream=async_reduce_stream, **kwargs)
    if async_reduce_stream is not None:
        torch.cuda.current_stream().wait_stream(async_reduce_stream)
    return result


def set_l2_norm_on_gpu(chunk) -> None:
    """Chunk.set_l2_norm without `.item()`: the squared norm of the chunk's valid gradients, a float64 tensor on the
    chunk's device (colossalai keeps a Python float, squared in float64). The norm is taken in float32 as
    colossalai's is, reading the bf16 gradients once instead of first writing a float32 copy of them."""
    assert chunk.l2_norm is None, "you are calculating the l2 norm twice"
    norm = torch.linalg.vector_norm(_valid_gradients(chunk), 2, dtype=torch.float32)
    chunk.l2_norm = norm.double().square()


def has_inf_or_nan_unless_bf16(chunk) -> bool | torch.Tensor:
    """Chunk.has_inf_or_nan, but False for bf16 gradients: their overflow count feeds only the fp16 loss scaler,
    which bf16 runs do not have (colossalai's BF16MixedPrecisionMixin never skips a step)."""
    if chunk.dtype == torch.bfloat16:
        return False
    return colossalais_own(type(chunk), "has_inf_or_nan").fget(chunk)


def _valid_gradients(chunk) -> torch.Tensor:
    """The part of a chunk on this rank that holds gradients, as colossalai's set_l2_norm selects it."""
    if chunk.is_gathered:
        return chunk.cuda_global_chunk[: chunk.utilized_size].detach()
    assert chunk.cuda_shard is not None
    return chunk.cuda_shard[: chunk.valid_end].detach()


def rearrange_accumulated_grad_chunk_in_place(manager, chunk):
    """ChunkManager.rearrange_accumulated_grad_chunk with the same result and no copies.

    colossalai clones the accumulated gradients, multiplies the clone by the number of ranks (the reduction after
    this micro-batch divides by it again), zeroes the re-gathered chunk and adds the clone into this rank's slice.
    Here the old shard is kept by reference and multiplied straight into that slice; the rest of the chunk is zeroed.
    A gathered chunk (kept gathered, or one rank) already holds its gradients in place.
    """
    grad_chunk = chunk.grad_chunk
    assert grad_chunk is not None
    ranks = chunk.pg_size
    if grad_chunk.is_gathered:
        grad_chunk = manager.init_grad_chunk(chunk)  # storage still allocated: the data stays where it is
        if ranks != 1:
            grad_chunk.cuda_global_chunk.mul_(ranks)
        return grad_chunk
    if grad_chunk.cuda_shard is not None:
        accumulated = grad_chunk.cuda_shard  # init_grad_chunk drops the chunk's reference to it, not ours
    else:
        from colossalai.accelerator import get_accelerator

        accumulated = grad_chunk.cpu_shard.to(get_accelerator().get_current_device())
    grad_chunk = manager.init_grad_chunk(chunk)
    full, begin, end = grad_chunk.cuda_global_chunk, grad_chunk.shard_begin, grad_chunk.shard_end
    full[:begin].zero_()
    full[end:].zero_()
    torch.mul(accumulated, ranks, out=full[begin:end])
    return grad_chunk


def debug_only_when_enabled(logger, message: str, ranks: list[int] | None = None) -> None:
    """DistributedLogger.debug, which does nothing unless its logger is enabled for DEBUG (item 4 of the module's
    doc). When it is, the same two records as colossalai's: the caller's "file:line function", then the message; the
    caller is read from its frame, not from inspect.stack(), which also reads the source of every frame."""
    if not logger._logger.isEnabledFor(logging.DEBUG):
        return
    caller = sys._getframe(1)
    logger._log("debug", f"{caller.f_code.co_filename}:{caller.f_lineno} {caller.f_code.co_name}", ranks)
    logger._log("debug", message, ranks)
