"""SwiGLU activation: silu(gate) * up."""
import torch
import torch.nn.functional as F


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


BACKENDS = {"torch": swiglu_torch}
