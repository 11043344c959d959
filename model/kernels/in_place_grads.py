"""Gradient accumulation inside the kernels: while `weight_grads_summed_in_place` is on, a kernel whose weights
already hold gradients adds the new ones into that .grad itself and hands autograd None, instead of a new tensor
that autograd's AccumulateGrad adds with a kernel of its own (reading and writing every gradient once more).

The training loop turns it on for the micro-batches of a step before its last (training/loop.py), where nothing
reads the gradients in between. The projections sum inside their GEMM (concat_linear.py, cuBLAS's beta = 1), the
Triton add + RMSNorm inside its second kernel (triton_rmsnorm.py).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

# Read in the backward, which autograd runs on its own thread for CUDA tensors: a module global, not a thread-local.
_sum_weight_grads_in_place = False


@contextmanager
def weight_grads_summed_in_place(enabled: bool = True):
    """While on, backwards add weight gradients into the weights' existing .grad inside their kernels (module doc).
    Only for backwards whose gradients nothing reads before the next: weights summed this way get no gradient hook
    call (AccumulateGrad does not run for them), so a reducing plugin must not be waiting for them."""
    global _sum_weight_grads_in_place
    previous, _sum_weight_grads_in_place = _sum_weight_grads_in_place, enabled
    try:
        yield
    finally:
        _sum_weight_grads_in_place = previous


def summing_weight_grads_in_place() -> bool:
    """Whether a backward running now may add its weight gradients into existing .grad: the flag is on, and this is
    not a traced backward (torch.compile), which stays plain."""
    return _sum_weight_grads_in_place and not torch.compiler.is_compiling()


def grad_to_sum_into(weight: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The parameter `weight`'s .grad when a backward may add into it now: in-place sums on, `weight` the leaf
    parameter itself (a kernel keeps it on its ctx, since a saved tensor unpacks as another; None where the forward
    was traced; a plain view, as Gemini's hookable calls pass, has no .grad of its own), and its .grad contiguous,
    of the weight's shape and of `dtype`. None otherwise, and autograd sums as usual."""
    if weight is None or not weight.is_leaf or not summing_weight_grads_in_place():
        return None
    grad = weight.grad
    if grad is None or grad.dtype != dtype or grad.shape != weight.shape or not grad.is_contiguous():
        return None
    return grad
