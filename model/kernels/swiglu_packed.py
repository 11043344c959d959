"""SwiGLU on the output of one fused gate-and-up projection: (..., 2F) laid out [gate | up] -> silu(gate) * up.

One GEMM against the concatenated gate_proj and up_proj weights replaces two, and its backward needs one
gradient (..., 2F) instead of two that autograd would sum into the input gradient with an extra kernel. The
activation must then read both halves of each row and, in the backward, write the gradient in that same layout.

Backends: `torch` (the reference: chunk, then swiglu's reference), `triton` (this suite's kernel,
triton_swiglu.py: reads both halves in place and writes both gradients over its input, as Liger's SwiGLU does, so
the backward allocates nothing), `flash_attn` (flash-attn's SwiGLU on the two halves).
"""
import torch

from .hookable import hookable
from .swiglu import swiglu_flash_attn, swiglu_torch


def swiglu_packed_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu_torch(gate, up)


@hookable
def swiglu_packed_triton(gate_up: torch.Tensor) -> torch.Tensor:
    from .triton_swiglu import PackedSwiGLU

    return PackedSwiGLU.apply(gate_up)


def swiglu_packed_flash_attn(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu_flash_attn(gate, up)


BACKENDS = {"torch": swiglu_packed_torch, "triton": swiglu_packed_triton, "flash_attn": swiglu_packed_flash_attn}
REQUIRES = {"triton": ("triton",), "flash_attn": ("flash_attn",)}
