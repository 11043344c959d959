"""Plugin name -> Colossal-AI booster plugin: the one place plugin options are set."""
from __future__ import annotations

import argparse
from contextlib import nullcontext

import torch

from training import gemini_fixes, zero_fixes

FP16_INITIAL_SCALE = 2**16  # the loss scale fp16 runs start from; the plugins' scalers adapt it
LOW_LEVEL_ZERO_PLUGINS = ("zero1", "zero2", "zero2_cpu")  # colossalai's LowLevelZeroPlugin


def build_plugin(args: argparse.Namespace, grad_accum_steps: int):
    """The booster plugin for `args.plugin`. Gradient clipping happens inside the ZeRO/Gemini optimizers."""
    from colossalai.booster.plugin import GeminiPlugin, LowLevelZeroPlugin, TorchDDPPlugin

    precision = args.mixed_precision
    if args.plugin == "ddp":
        return TorchDDPPlugin()
    if args.plugin in LOW_LEVEL_ZERO_PLUGINS:
        zero_fixes.apply()
        world_size = _world_size()
        return LowLevelZeroPlugin(
            stage=zero_stage(world_size, args.plugin), precision=precision, initial_scale=FP16_INITIAL_SCALE,
            max_norm=args.grad_clip, cpu_offload=args.plugin == "zero2_cpu",
            overlap_communication=overlaps_zero_communication(world_size),
        )
    if args.plugin in ("gemini", "gemini_auto"):
        gemini_fixes.apply()
        placement = {"gemini": "static", "gemini_auto": "auto"}[args.plugin]
        world_size = _world_size()
        options = dict(offload_optim_frac=args.offload_optim_frac, offload_param_frac=args.offload_param_frac,
                       shard_param_frac=shard_param_frac(args, world_size))
        # Asynchronous reduction overlaps the gradients' reduce-scatter with the backward, and ends every backward
        # with a host synchronisation on its stream; one GPU has nothing to overlap and only pays the stall.
        return GeminiPlugin(
            placement_policy=placement, precision=precision, initial_scale=FP16_INITIAL_SCALE,
            max_norm=args.grad_clip, enable_gradient_accumulation=grad_accum_steps > 1,
            max_prefetch=gemini_prefetch(args, world_size), enable_async_reduce=world_size > 1,
            **(options if placement == "static" else {}),
        )
    if args.plugin == "hybrid_parallel":
        return _hybrid_parallel_plugin(args, grad_accum_steps)
    raise SystemExit(f"error: unknown plugin {args.plugin}")


def shard_param_frac(args: argparse.Namespace, world_size: int) -> float:
    """Gemini's shard_param_frac (static placement): 0 on one GPU, 1 on several, or with --offload_param_frac.

    On one GPU a chunk's shard is the whole chunk, so sharding saves no memory; it only costs a copy of every
    parameter chunk out of its shard before each use, forward and backward, and back after. Offloading parameters to
    the CPU needs sharded chunks. Several GPUs keep colossalai's default: whole parameters there cost every GPU a
    full bf16 copy of the model for little speed once the next chunks are prefetched (`gemini_prefetch`). On two
    H200s with the stream ordering of training/gemini_fixes.py (without which 7b's loss went NaN in that layout),
    whole against sharded and prefetched: 1b 16 x 8, 74.8k against 74.4k tokens/s/GPU (51.8 against 51.2 GiB);
    7b 2 x 4 at sequence 4096, 11.8k against 11.6k (96.2 against 89.6 GiB), losses finite.
    """
    return 0.0 if world_size == 1 and not args.offload_param_frac else 1.0


GEMINI_PREFETCH_SEVERAL_GPUS = 4


def gemini_prefetch(args: argparse.Namespace, world_size: int) -> int:
    """Gemini's max_prefetch: --gemini_prefetch if given, else 4 chunks on several GPUs and none on one.

    Prefetching gathers the next parameter chunks (an all-gather each) while the current layers compute. On two H200s
    4 gave 1b 75.0k against 74.1k tokens/s/GPU (16 x 8) and 7b 11.6k against 11.3k (2 x 4, sequence 4096), for
    0.3 GiB more (training/planner.py counts the prefetched chunks). One GPU keeps its chunks whole
    (`shard_param_frac`), so there is nothing to gather, except with --offload_param_frac, which is not measured.
    """
    if args.gemini_prefetch is not None:
        return args.gemini_prefetch
    return GEMINI_PREFETCH_SEVERAL_GPUS if world_size > 1 else 0


def zero_stage(world_size: int, plugin_name: str = "zero2") -> int:
    """LowLevelZero's stage: for -p zero2 and zero2_cpu 2, but 1 on a single GPU; for -p zero1 always 1.

    Stage 2 partitions gradients over the data-parallel ranks, so it reduces every micro-batch's gradients through
    its buckets as soon as the backward makes them (colossalai refuses no_sync at stage 2). On one rank there is
    nothing to partition, and that reduction is five passes over every gradient per micro-batch that change nothing:
    a copy into the bucket, flattening, a division by one, a reduce-scatter over one rank, a copy back. Stage 1 holds
    the same memory on one rank and supports no_sync, so gradient accumulation sums the gradients in place
    (`defers_grad_sync`), reducing once per step. On several GPUs, stage 2 stays: its partitioned gradients are why
    one picks zero2 over zero1 (-p zero1: stage 1 on any number of GPUs, which keeps full gradients on every GPU and,
    with gradient accumulation, sums them in place and reduces once per step; on two H200s, 1b at 16 x 16, 79.7k
    tokens/s/GPU against zero2's 76.8k, for 1 GiB more).
    """
    return 1 if world_size == 1 or plugin_name == "zero1" else 2


def overlaps_zero_communication(world_size: int) -> bool:
    """LowLevelZero's overlap_communication: on several GPUs, as colossalai's default, its gradient reduction runs
    on its own stream during the backward; one GPU has nothing to reduce (training/zero_fixes.py
    `reduce_unless_alone`), and the overlapping path would end every backward that syncs with a device-wide
    synchronisation (LowLevelZeroOptimizer.backward), leaving the GPU idle while the host starts the step."""
    return world_size > 1


def defers_grad_sync(plugin_name: str, plugin) -> bool:
    """Whether the loop runs every micro-batch of a step but the last under booster.no_sync, which leaves the
    gradient reduction to the last one: wherever the built plugin supports no_sync (colossalai's
    `support_no_sync`: plain DDP, and LowLevelZero at stage 1, see `zero_stage`). Gemini accumulates in its own
    chunks. hybrid_parallel says it supports no_sync but refuses it at --zero 2, and the loop has not been checked
    with it under tensor parallelism, so it keeps reducing every micro-batch."""
    return plugin_name != "hybrid_parallel" and plugin.support_no_sync()


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def _hybrid_parallel_plugin(args: argparse.Namespace, grad_accum_steps: int):
    """Tensor (--tp), pipeline (--pp) and sequence parallelism with ZeRO (--zero) over the data-parallel rest, for
    the suite's Llama through model/policy.py. With --pp > 1 the loop runs each optimizer step's rows (micro batch
    x gradient accumulation) as one pipeline batch of --microbatch_size micro-batches."""
    import torch.distributed as dist
    from colossalai.booster.plugin import HybridParallelPlugin

    from model.policy import LlamaPolicy

    _check_hybrid_parallel(args, dist.get_world_size(), grad_accum_steps)
    pipeline = dict(pp_style=args.pp_style, num_model_chunks=args.num_model_chunks,
                    microbatch_size=args.microbatch_size) if args.pp > 1 else {}
    # split_gather and ring run over the tp group: sp_size 1 says no separate sequence-parallel group
    sequence = dict(enable_sequence_parallelism=True, sequence_parallelism_mode=args.sequence_parallel,
                    sp_size=1) if args.sequence_parallel else {}
    return HybridParallelPlugin(
        tp_size=args.tp, pp_size=args.pp, zero_stage=args.zero, precision=args.mixed_precision,
        initial_scale=FP16_INITIAL_SCALE, max_norm=args.grad_clip, custom_policy=LlamaPolicy(args.pp_layers),
        **pipeline, **sequence,
    )


def _check_hybrid_parallel(args: argparse.Namespace, world_size: int, grad_accum_steps: int) -> None:
    """One clear line for a hybrid_parallel layout that colossalai would reject with an assertion, or later."""
    def fail(message):
        raise SystemExit(f"error: -p hybrid_parallel: {message}")

    for flag in ("tp", "pp", "microbatch_size", "num_model_chunks"):
        if getattr(args, flag) < 1:
            fail(f"--{flag} must be at least 1")
    if world_size % (args.tp * args.pp):
        fail(f"{world_size} GPUs do not split into groups of --tp {args.tp} x --pp {args.pp}")
    if args.zero > 0 and args.mixed_precision == "fp32":
        fail(f"--zero {args.zero} needs -x bf16 or fp16")
    if args.sequence_parallel:
        if args.tp < 2:
            fail(f"--sequence_parallel {args.sequence_parallel} splits the sequence over the tensor-parallel ranks: "
                 f"needs --tp 2 or more")
        if args.max_length % args.tp:
            fail(f"--sequence_parallel needs the sequence length {args.max_length} divisible by --tp {args.tp}")
    if args.pp == 1:
        given = [flag for flag, default in (("pp_style", "1f1b"), ("num_model_chunks", 1), ("pp_layers", None),
                                            ("microbatch_size", 1)) if getattr(args, flag) != default]
        if given:
            fail(f"--{given[0]} applies to pipeline parallelism only (--pp 2 or more)")
        return
    if args.zero > 1:
        fail(f"--zero {args.zero} with --pp {args.pp}: colossalai allows ZeRO stage 0 or 1 with pipelines")
    if getattr(args, "eval_interval", 0):
        fail(f"--eval_interval with --pp {args.pp}: validation does not run through the pipeline schedule yet")
    if (args.pp_style == "interleaved") != (args.num_model_chunks > 1):
        fail(f"--pp_style {args.pp_style} with --num_model_chunks {args.num_model_chunks}: interleaved needs 2 "
             f"or more model chunks, 1f1b exactly 1")
    rows = args.batch_size * grad_accum_steps  # one pipeline batch per optimizer step
    if rows % args.microbatch_size:
        fail(f"the {rows} rows of a step (batch {args.batch_size} x accumulation {grad_accum_steps}) do not split "
             f"into --microbatch_size {args.microbatch_size}")
    micro_batches = rows // args.microbatch_size
    if micro_batches < args.pp or (args.pp_style == "interleaved" and micro_batches % args.pp):
        need = "a multiple of" if args.pp_style == "interleaved" else "at least"
        fail(f"a step has {micro_batches} micro-batches (batch {args.batch_size} x accumulation {grad_accum_steps} "
             f"/ --microbatch_size {args.microbatch_size}); the {args.pp_style} schedule needs {need} --pp "
             f"{args.pp}: raise -b or --global_batch_tokens, or lower --microbatch_size")


def data_parallel_rank(args: argparse.Namespace, rank: int, world_size: int) -> tuple[int, int]:
    """(this process's data-parallel rank, the number of data-parallel ranks): the coordinates the loaders shard by.

    Every plugin but hybrid_parallel is pure data parallelism. Under hybrid_parallel the --tp x --pp ranks of one
    model replica read the same batches; colossalai's process mesh puts data parallelism outermost, so ranks
    [i * tp * pp, (i + 1) * tp * pp) hold replica i.
    """
    if args.plugin != "hybrid_parallel":
        return rank, world_size
    model_parallel = args.tp * args.pp
    if world_size % model_parallel:
        raise SystemExit(f"error: -p hybrid_parallel: {world_size} GPUs do not split into groups of --tp {args.tp} "
                         f"x --pp {args.pp}")
    return rank // model_parallel, world_size // model_parallel


def builds_lazily(plugin_name: str) -> bool:
    """Gemini and hybrid_parallel build the model lazily, so that 7B and larger never exist unsharded on one
    device: parameters materialize when the plugin shards them (for hybrid_parallel, only this stage's)."""
    return plugin_name.startswith("gemini") or plugin_name == "hybrid_parallel"


def model_init_context(plugin_name: str):
    """See builds_lazily. model/policy.py makes hybrid_parallel's lazy weights independent of the layout."""
    if builds_lazily(plugin_name):
        from colossalai.accelerator import get_accelerator
        from colossalai.lazy import LazyInitContext

        return LazyInitContext(default_device=get_accelerator().get_current_device())  # this GPU (the CPU without)
    return nullcontext()


# the dtype colossalai's LowLevelZeroModel casts the model to, by --mixed_precision; fp32 stays as it is
_LOW_LEVEL_ZERO_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def place_weights_for_plugin(model: torch.nn.Module, plugin_name: str, precision: str) -> None:
    """For the plugins that take an eagerly built model (ddp, zero2, zero2_cpu): give it now the dtype and device
    the plugin would give it, and lay each layer's q/k/v and gate/up weights side by side in one buffer
    (model/llama.py place_fused_weights_side_by_side: their GEMMs then read them in place instead of a copy).

    Before boosting, for two reasons. The plugin's own .to() makes new tensors for parameters of another dtype or
    device, which would scatter the weights again, but keeps tensors that already have them. And LowLevelZero keeps
    a view of each weight's storage, taken when it is built, to write the new values of weights larger than its
    bucket into (7b's MLP weights): such weights moved after it would not be updated (tests/model/test_plugins_gpu.py
    shows both). Gemini and hybrid_parallel build lazily and place parameters in their own chunks and shards: left
    as they are.
    """
    place = getattr(model, "place_fused_weights_side_by_side", None)  # the suite's model; not --baseline hf's
    if place is None or builds_lazily(plugin_name):
        return
    from colossalai.accelerator import get_accelerator

    if plugin_name in LOW_LEVEL_ZERO_PLUGINS and precision in _LOW_LEVEL_ZERO_DTYPES:
        model.to(_LOW_LEVEL_ZERO_DTYPES[precision])  # first, as LowLevelZeroModel does: 7b's fp32 stays on the host
    model.to(get_accelerator().get_current_device())
    place()


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """HybridAdam (fused CUDA / CPU Adam) with a GPU, torch AdamW without.

    colossalai builds HybridAdam's CPU kernel as a CUDA extension, so it cannot load on a machine with no CUDA.
    Weight decay skips norms (one-dimensional parameters), as Llama's recipe does.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if torch.cuda.is_available():
        from colossalai.nn.optimizer import HybridAdam

        return HybridAdam(groups, lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay)
    return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay)


def clips_inside_optimizer(plugin_name: str) -> bool:
    """ZeRO and Gemini clip inside their optimizer step (max_norm); plain DDP is clipped by the loop."""
    return plugin_name != "ddp"
