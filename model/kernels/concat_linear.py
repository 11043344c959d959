"""One GEMM for several projections of the same input: x @ cat(w1, w2, ...).T, split back per weight.

Llama projects each normalised hidden state three times for attention (q, k, v) and twice for the MLP (gate, up).
Separately, the small key and value GEMMs run well below the GPU's peak, and the backward sums three (or two) input
gradients with extra elementwise kernels. Here both directions are one GEMM each against the concatenated weight,
and the input gradient comes out summed.

The weights stay separate parameters (q_proj.weight, ...), so checkpoints keep Hugging Face's layout, and only they
are saved for the backward: the concatenation is made again there instead of being kept alive from forward to
backward (for 7b, 280 MB per layer). `hookable` lets Gemini fetch the weights' chunks, as for any fused kernel.

With a single weight it is a plain bias-free linear layer (o_proj, down_proj), taken here for the second use:
gradient accumulation. Under in_place_grads.py's `weight_grads_summed_in_place`, which the training loop turns on
for the micro-batches of a step before its last, a backward whose weights already hold gradients adds the new weight
gradient into them inside the GEMM (C += A @ B, cuBLAS's beta = 1) and hands autograd none, instead of a new tensor
that autograd then adds with a separate kernel that reads and writes every gradient once more (for 1b, about 6 ms
per micro-batch of 32,768 tokens on an H100). The first micro-batch's gradients are the split views of one GEMM
output, which autograd keeps as they are, so q, k and v's gradients lie side by side and later sums are again one
GEMM.

The weights themselves can lie side by side too (`place_side_by_side`, which training/plugins.py applies before the
eager plugins take the model; Gemini's chunks hold them so by themselves, in the order the model registers them):
the GEMMs then read the joined weight as a view of that buffer instead of a `torch.cat` copy, forward and backward.
For 1b that copy wrote 1.2 GB per direction per micro-batch, about 2 ms of an H100's 413 ms at micro batch 16.
"""
from __future__ import annotations

import torch

from .hookable import hookable
from .in_place_grads import summing_weight_grads_in_place


def side_by_side(tensors) -> torch.Tensor | None:
    """Two-dimensional tensors of one width as one (sum of rows, width) view, when they lie contiguously, in order,
    in one storage; None otherwise (then only a copy can join them). Also None for views into a freed storage, as
    Gemini leaves its parameters between uses.

    Called in every forward and backward of every projection, so it reads addresses, not storage objects: each
    tensor must start where the one before it ends, and the first one's storage must hold them all (which also
    puts them all on its device)."""
    first = tensors[0]
    if first.dim() != 2:
        return None
    width, dtype, size = first.shape[1], first.dtype, first.element_size()
    start, rows = first.data_ptr(), 0
    for t in tensors:
        if (t.dim() != 2 or t.shape[1] != width or t.dtype != dtype or not t.is_contiguous()
                or t.data_ptr() != start + rows * width * size):
            return None
        rows += t.shape[0]
    if first.untyped_storage().nbytes() < (first.storage_offset() + rows * width) * size:
        return None
    return first.as_strided((rows, width), (width, 1))


def _joinable(tensors) -> bool:
    """Whether the tensors can be rows of one matrix: two-dimensional, of one width, dtype and device."""
    first = tensors[0]
    return all(t.dim() == 2 and t.shape[1] == first.shape[1] and t.dtype == first.dtype and t.device == first.device
               for t in tensors)


def grads_side_by_side(weights) -> torch.Tensor | None:
    """The weights' gradients as one (sum of out features, in features) tensor when they lie side by side, as an
    earlier backward here left them; None if any is missing or they lie elsewhere."""
    grads = [w.grad for w in weights]
    return None if any(g is None for g in grads) else side_by_side(grads)


@torch.no_grad()
def place_side_by_side(weights) -> bool:
    """Move the weights' data, in order, into one new buffer of their dtype and device, so that the GEMM here reads
    them joined without copying them (see the module doc). Parameters stay the same objects, so optimizers built
    before keep them; only their .data moves. Returns False, changing nothing, for weights that cannot be joined
    (different dtypes, devices or widths). Call before a plugin keeps references to the weights' storage:
    colossalai's LowLevelZero writes the new values of large weights into views it took when it was built."""
    if side_by_side(weights) is not None:
        return True
    if not _joinable(weights):
        return False
    first = weights[0]
    buffer = torch.empty((sum(w.shape[0] for w in weights), first.shape[1]), dtype=first.dtype, device=first.device)
    for w, part in zip(weights, buffer.split([w.shape[0] for w in weights])):
        part.copy_(w)
        w.data = part
    return True


def _sum_into_existing_grads(weights, grad_out: torch.Tensor, x: torch.Tensor) -> bool:
    """grad_out.T @ x added into the weights' gradients by one GEMM, if in-place sums are on and possible. `weights`
    is None where the forward was traced (torch.compile): a traced backward stays plain."""
    if weights is None or not summing_weight_grads_in_place():
        return False
    summed = grads_side_by_side(weights)
    if summed is None or summed.dtype != x.dtype:  # e.g. float32 gradients of autocast weights
        return False
    summed.addmm_(grad_out.t(), x)
    return True


class _ConcatLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        # Under autocast (plain DDP trains float32 weights that way) compute in the autocast dtype, as F.linear
        # would; the backward runs outside autocast, so it casts by itself, from the dtype of the saved input. Both
        # operands are cast here, so autocast, if on, finds nothing left to cast in the matmul. Each step runs four
        # of these per layer, so no cast is called where there is nothing to cast (at small micro batches the host
        # sets the pace).
        dtype = linear_dtype(x)
        x = _as(x, dtype)
        ctx.save_for_backward(x, *weights)
        if not torch.compiler.is_compiling():
            ctx.weights = weights  # the parameters themselves, for their .grad (a saved tensor unpacks as another)
        return x @ _as(_joined(weights), dtype).t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, *weights = ctx.saved_tensors
        grad_out = _as(grad_out, x.dtype)
        grad_x = grad_out @ _as(_joined(weights), x.dtype) if ctx.needs_input_grad[0] else None
        if not any(ctx.needs_input_grad[1:]):  # frozen weights
            return grad_x, *(None for _ in weights)
        grad_out, x = grad_out.flatten(0, -2), x.flatten(0, -2)
        if all(ctx.needs_input_grad[1:]) and _sum_into_existing_grads(getattr(ctx, "weights", None), grad_out, x):
            return grad_x, *(None for _ in weights)
        grad_weight = grad_out.t() @ x  # (sum of out features, in features)
        return grad_x, *(_as(g, w.dtype) for g, w in zip(grad_weight.split([w.shape[0] for w in weights]), weights))


@hookable
def concat_linear(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    """x (..., d_in) and weights (d_out_i, d_in) -> (..., sum of d_out_i): the projections side by side."""
    return _ConcatLinear.apply(x, *weights)


def linear_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would multiply x in: autocast's where autocast is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, without a call into torch when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def _joined(weights) -> torch.Tensor:
    """The weights as one tensor: a view where they lie side by side, else a copy (cat would copy even one weight).
    A traced forward (torch.compile) keeps the copy, which the compiler may fuse."""
    if len(weights) == 1:
        return weights[0]
    joined = None if torch.compiler.is_compiling() else side_by_side(weights)
    return torch.cat(weights) if joined is None else joined
