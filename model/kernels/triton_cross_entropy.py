"""Triton kernel and autograd function of the `triton` backend of loss.py; imported only when that backend runs.

The LM head and cross-entropy in one pass over chunks of rows, as Liger's fused linear cross-entropy does: a chunk's
logits are one GEMM, one kernel turns each row of them into its loss and, in place, into the gradient of that loss
(softmax minus the one-hot label), and two more GEMMs turn that into the chunk's share of both gradients. The full
(rows, vocab) logits never exist, and the backward only scales the gradients the forward made.

Why not Liger's: it waits for the GPU twice per call. Its forward counts the labelled rows with `.item()`, and its
backward compares the upstream gradient with 1.0 through `torch.equal`; each wait empties the GPU's queue, which
then sits idle while the host launches the next kernels. Here the forward returns the sum of the row losses and the
mean is taken on the device (loss.py), so nothing leaves the GPU; tests/model/test_kernels.py checks that under
`torch.cuda.set_sync_debug_mode("error")`.
"""
import torch
import triton
import triton.language as tl

from .concat_linear import linear_dtype
from .loss import fused_chunk_rows

MAX_BLOCK = 32768  # columns per step of the row loop: a 32,000 vocabulary is one step


@triton.jit
def _cross_entropy_kernel(logits_ptr, labels_ptr, losses_ptr, n_cols, row_stride, ignore_index,
                          WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: loss = logsumexp(x) - x[label], in float32; with WRITE_GRAD, softmax(x) - onehot(label)
    written over x. An ignored row has loss 0 and gradient 0; a label outside the vocabulary gives a NaN loss (the
    training loop stops on it) instead of a read out of bounds."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(losses_ptr + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                tl.store(row_ptr + cols, tl.zeros([BLOCK], dtype=logits_ptr.dtype.element_ty), mask=cols < n_cols)
        return
    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, n_cols, BLOCK):  # online logsumexp
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, 0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    in_vocab = (label >= 0) & (label < n_cols)
    target = tl.load(row_ptr + label, mask=in_vocab, other=float("nan")).to(tl.float32)
    tl.store(losses_ptr + row, lse - target)
    if WRITE_GRAD:  # after reading the target logit, which this overwrites
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(x_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    tl.store(x_ptr + offsets, (x.to(tl.float32) * tl.load(scale_ptr)).to(x.dtype), mask=mask)


def scale_in_place(t: torch.Tensor, scale: torch.Tensor) -> None:
    """t *= scale, a one-element tensor read on the device: no wait for the GPU, where comparing it with 1.0 first
    (Liger) needs one. torch's own t.mul_(scale) runs unvectorised for a bf16 t and a float32 scale (0.3 ms for a 1b
    micro-batch's hidden-state gradient on an H100)."""
    assert t.is_contiguous()
    n, block = t.numel(), 4096
    _scale_kernel[(triton.cdiv(n, block),)](t, scale.float(), n, BLOCK=block)


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor, ignore_index: int,
                       write_grad: bool) -> None:
    """losses[i] = cross-entropy of logits row i against labels[i]; with write_grad, its gradient over the logits."""
    rows, vocab = logits.shape
    block = min(MAX_BLOCK, triton.next_power_of_2(vocab))
    _cross_entropy_kernel[(rows,)](logits, labels, losses, vocab, logits.stride(0), ignore_index,
                                   WRITE_GRAD=write_grad, BLOCK=block, num_warps=min(32, max(4, block // 1024)))


class LinearCrossEntropySum(torch.autograd.Function):
    """Sum over rows of cross-entropy(hidden @ weight.T, labels): hidden (rows, d), weight (vocab, d), labels (rows,).
    With `with_grads`, the forward also computes both gradients of the sum, which the backward scales."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                with_grads: bool) -> torch.Tensor:
        dtype = linear_dtype(hidden)
        x, w = hidden.to(dtype).contiguous(), weight.to(dtype)  # as F.linear would under autocast
        labels = labels.contiguous()  # the kernel reads one label per row at unit stride
        grad_x = torch.empty_like(x) if with_grads and ctx.needs_input_grad[0] else None
        grad_w = None
        want_grad_w = with_grads and ctx.needs_input_grad[1]
        rows, vocab = x.shape[0], w.shape[0]
        step = fused_chunk_rows(rows, x.shape[1], vocab)  # as Liger chunks
        logits = x.new_empty(step, vocab)
        losses = torch.empty(rows, dtype=torch.float32, device=x.device)
        for start in range(0, rows, step):
            end = min(start + step, rows)
            chunk_x, chunk_logits = x[start:end], logits[: end - start]
            torch.mm(chunk_x, w.t(), out=chunk_logits)
            cross_entropy_rows(chunk_logits, labels[start:end], losses[start:end], ignore_index,
                               write_grad=grad_x is not None or want_grad_w)
            if grad_x is not None:
                torch.mm(chunk_logits, w, out=grad_x[start:end])
            if want_grad_w:
                grad_w = _add_weight_grad(grad_w, chunk_logits, chunk_x, weight.dtype)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.hidden_dtype = hidden.dtype
        return losses.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_sum: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        for grad in (grad_x, grad_w):
            if grad is not None:
                scale_in_place(grad, grad_sum)
        return None if grad_x is None else grad_x.to(ctx.hidden_dtype), grad_w, None, None, None


def _add_weight_grad(total, grad_logits, x, weight_dtype):
    """total + grad_logits.T @ x, in the weight's dtype; the first chunk writes it, later ones add inside the GEMM.
    Float32 weights under autocast (plain DDP) sum their chunks in float32."""
    if grad_logits.dtype != weight_dtype:
        part = (grad_logits.t() @ x).to(weight_dtype)
        return part if total is None else total.add_(part)
    if total is None:
        return grad_logits.t() @ x
    return total.addmm_(grad_logits.t(), x)
