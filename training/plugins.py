"""Plugin name -> Colossal-AI booster plugin: the one place plugin options are set."""
from __future__ import annotations

import argparse
from contextlib import nullcontext

import torch

FP16_INITIAL_SCALE = 2**16  # the loss scale fp16 runs start from; the plugins' scalers adapt it


def build_plugin(args: argparse.Namespace, grad_accum_steps: int):
    """The booster plugin for `args.plugin`. Gradient clipping happens inside the ZeRO/Gemini optimizers."""
    from colossalai.booster.plugin import GeminiPlugin, LowLevelZeroPlugin, TorchDDPPlugin

    precision = args.mixed_precision
    if args.plugin == "ddp":
        return TorchDDPPlugin()
    if args.plugin in ("zero2", "zero2_cpu"):
        return LowLevelZeroPlugin(
            stage=2, precision=precision, initial_scale=FP16_INITIAL_SCALE, max_norm=args.grad_clip,
            cpu_offload=args.plugin == "zero2_cpu",
        )
    if args.plugin in ("gemini", "gemini_auto"):
        placement = {"gemini": "static", "gemini_auto": "auto"}[args.plugin]
        options = dict(offload_optim_frac=args.offload_optim_frac, offload_param_frac=args.offload_param_frac)
        return GeminiPlugin(
            placement_policy=placement, precision=precision, initial_scale=FP16_INITIAL_SCALE,
            max_norm=args.grad_clip, enable_gradient_accumulation=grad_accum_steps > 1,
            **(options if placement == "static" else {}),
        )
    if args.plugin == "hybrid_parallel":
        raise SystemExit(
            "error: -p hybrid_parallel needs a shardformer policy for the suite's model, which is not written yet "
            "(colossalai's own Llama policy does not import on transformers 5); use gemini or zero2 for now"
        )
    raise SystemExit(f"error: unknown plugin {args.plugin}")


def model_init_context(plugin_name: str):
    """Gemini builds the model lazily so that 7B and larger never exist unsharded on one device."""
    if plugin_name.startswith("gemini"):
        from colossalai.lazy import LazyInitContext

        return LazyInitContext(default_device=torch.device("cuda", torch.cuda.current_device()))
    return nullcontext()


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
