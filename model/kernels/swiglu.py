"""SwiGLU activation: silu(gate) * up.

Backends: `torch` (the reference), `liger` (liger-kernel's Triton SiLU-mul; its backward recomputes from the saved
inputs and writes the gradients over them), `flash_attn` (flash-attn's jiterator kernel from flash_attn.ops).
"""
import torch
import torch.nn.functional as F

from .hookable import hookable


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@hookable
def swiglu_liger(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply(gate, up)


@hookable
def swiglu_flash_attn(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from flash_attn.ops.activations import swiglu

    return swiglu(gate, up)


BACKENDS = {"torch": swiglu_torch, "liger": swiglu_liger, "flash_attn": swiglu_flash_attn}
REQUIRES = {"liger": ("liger_kernel", "triton"), "flash_attn": ("flash_attn",)}
