"""Residual add fused with the RMSNorm that follows it: s = x + residual, returns (rms_norm(s), s).

A pre-norm decoder adds each sub-layer's output to the residual stream and normalises the sum for the next
sub-layer. Done apart, that is one kernel reading x and residual and writing s, then the norm reading s again;
in the backward, the norm's input gradient and the stream's gradient are summed by yet another kernel. The fused
backends read each tensor once and add the stream's gradient inside the norm's backward.

Backends: `torch` (the reference: the add, then rmsnorm's reference), `triton` (this suite's kernels,
triton_rmsnorm.py: the same arithmetic as Liger's, with a backward that runs at memory bandwidth), `liger`
(liger-kernel's fused add + RMSNorm, Llama casting), `flash_attn` (flash-attn's Triton norm with a residual, prenorm
output).
"""
import torch

from .hookable import hookable
from .rmsnorm import rms_norm_torch


def add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    total = x + residual
    return rms_norm_torch(total, weight, eps), total


@hookable
def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    from .triton_rmsnorm import AddRMSNorm

    return AddRMSNorm.apply(x, residual, weight, eps)


@hookable
def add_rms_norm_liger(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

    # offset 0, Llama casting; in_place=False for the reason given in rmsnorm.py
    return LigerFusedAddRMSNormFunction.apply(x, residual, weight, eps, 0.0, "llama", False)


@hookable
def add_rms_norm_flash_attn(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    from flash_attn.ops.triton.layer_norm import rms_norm_fn

    return rms_norm_fn(x, weight, None, residual=residual, eps=eps, prenorm=True)


BACKENDS = {"torch": add_rms_norm_torch, "triton": add_rms_norm_triton, "liger": add_rms_norm_liger,
            "flash_attn": add_rms_norm_flash_attn}
REQUIRES = {"triton": ("triton",), "liger": ("liger_kernel", "triton"), "flash_attn": ("flash_attn", "triton")}
