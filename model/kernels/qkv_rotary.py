"""Rotary embedding applied straight to the output of the fused q/k/v projection: (B, T, (H + 2 Hkv) D) laid out
[q | k | v] -> q (B, T, H, D) and k (B, T, Hkv, D) rotated, v (B, T, Hkv, D), each its own contiguous tensor.

With q, k and v from one GEMM (kernels/concat_linear.py), splitting the output gives views with the row stride of
the whole projection. A rotary kernel that wants contiguous inputs copies q and k first, then rotates them, and v is
copied too (so attention does not keep the projection's output alive); in the backward, rotary's gradients are
then concatenated into the projection's gradient by yet another kernel. The fused backend reads the projection's
output once and writes the three tensors, and in the backward writes the three gradients straight into one
(B, T, (H + 2 Hkv) D) gradient.

Backends: `torch` (the reference: split, then rotary's reference), `triton` (this suite's kernel, triton_rotary.py),
`liger` and `flash_attn` (split, then that package's rotary).
"""
import torch

from . import rotary
from .hookable import hookable


def split_heads(qkv: torch.Tensor, n_heads: int, n_kv_heads: int):
    """Views q (B, T, H, D), k and v (B, T, Hkv, D) of a (B, T, (H + 2 Hkv) D) projection output."""
    head_dim = qkv.shape[-1] // (n_heads + 2 * n_kv_heads)
    q, k, v = qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    batch, seq = qkv.shape[:2]
    return (q.view(batch, seq, n_heads, head_dim), k.view(batch, seq, n_kv_heads, head_dim),
            v.view(batch, seq, n_kv_heads, head_dim))


def _split_then(rotate):
    """qkv_rotary from a rotary backend: split, rotate q and k, copy v out of the projection's output."""
    def qkv_rotary(qkv, cos, sin, n_heads: int, n_kv_heads: int):
        q, k, v = split_heads(qkv, n_heads, n_kv_heads)
        q, k = rotate(q, k, cos, sin)
        return q, k, v.contiguous()
    qkv_rotary.__name__ = f"qkv_rotary_{rotate.__name__.removeprefix('rotary_')}"
    return qkv_rotary


qkv_rotary_torch = _split_then(rotary.rotary_torch)


@hookable
def qkv_rotary_triton(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int):
    from .triton_rotary import QKVRotary

    return QKVRotary.apply(qkv, cos, sin, n_heads, n_kv_heads)


BACKENDS = {"torch": qkv_rotary_torch, "triton": qkv_rotary_triton, "liger": _split_then(rotary.rotary_liger),
            "flash_attn": _split_then(rotary.rotary_flash_attn)}
REQUIRES = {"triton": ("triton",), **rotary.REQUIRES}
