"""One GEMM for several projections of the same input: x @ cat(w1, w2, ...).T, split back per weight.

Llama projects each normalised hidden state three times for attention (q, k, v) and twice for the MLP (gate, up).
Separately, the small key and value GEMMs run well below the GPU's peak, and the backward sums three (or two) input
gradients with extra elementwise kernels. Here both directions are one GEMM each against the concatenated weight,
and the input gradient comes out summed.

The weights stay separate parameters (q_proj.weight, ...), so checkpoints keep Hugging Face's layout, and only they
are saved for the backward: the concatenation is made again there instead of being kept alive from forward to
backward (for 7b, 280 MB per layer). `hookable` lets Gemini fetch the weights' chunks, as for any fused kernel.
"""
from __future__ import annotations

import torch

from .hookable import hookable


class _ConcatLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        # Under autocast (plain DDP trains float32 weights that way) compute in the autocast dtype, as F.linear
        # would; the backward runs outside autocast, so it casts by itself, from the dtype of the saved input.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x = x.to(dtype)
        ctx.save_for_backward(x, *weights)
        with torch.autocast(device, enabled=False):
            return x @ torch.cat(weights).to(dtype).t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, *weights = ctx.saved_tensors
        grad_out = grad_out.to(x.dtype)
        grad_x = grad_out @ torch.cat(weights).to(x.dtype) if ctx.needs_input_grad[0] else None
        if not any(ctx.needs_input_grad[1:]):  # frozen weights
            return grad_x, *(None for _ in weights)
        grad_weight = grad_out.flatten(0, -2).t() @ x.flatten(0, -2)  # (sum of out features, in features)
        return grad_x, *(g.to(w.dtype) for g, w in zip(grad_weight.split([w.shape[0] for w in weights]), weights))


@hookable
def concat_linear(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    """x (..., d_in) and weights (d_out_i, d_in) -> (..., sum of d_out_i): the projections side by side."""
    return _ConcatLinear.apply(x, *weights)
