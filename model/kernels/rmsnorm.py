"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 as Llama does.

Backends: `torch` (the reference), `liger` (liger-kernel's Triton kernel, Llama casting), `flash_attn` (flash-attn's
Triton layer norm in RMS mode; it scales in float32 before the cast, a rounding step away from Llama's order).
"""
import torch

from .hookable import hookable


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference. Normalises in float32, casts back, then scales (the order transformers' Llama uses)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


@hookable
def rms_norm_liger(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # offset 0, Llama casting. in_place=False: Liger's in-place backward writes dx over the incoming gradient,
    # wrong wherever that gradient is also used elsewhere (Liger's own note names residual streams); the cost is
    # one activation-sized buffer.
    return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)


@hookable
def rms_norm_flash_attn(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from flash_attn.ops.triton.layer_norm import rms_norm_fn

    return rms_norm_fn(x, weight, None, eps=eps)


BACKENDS = {"torch": rms_norm_torch, "liger": rms_norm_liger, "flash_attn": rms_norm_flash_attn}
REQUIRES = {"liger": ("liger_kernel", "triton"), "flash_attn": ("flash_attn", "triton")}
