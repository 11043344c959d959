"""Triton kernels of the `triton` backend of swiglu_packed.py; imported only when that backend runs.

Each program handles one block of columns of one row: it reads gate[c] and up[c] from the row's two halves and
writes silu(gate) * up. The backward recomputes silu from the saved input and writes d_gate and d_up over it, so the
gradient of the packed input comes out in the packed layout without another buffer.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _program_block(n_cols, BLOCK: tl.constexpr):
    """This program's row, its block of columns, and which of them exist."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return row, cols, cols < n_cols


@triton.jit
def _swiglu_packed_forward_kernel(gate_up_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row, cols, mask = _program_block(n_cols, BLOCK)
    gate_ptr = gate_up_ptr + row * 2 * n_cols  # the row's gate half; its up half follows at + n_cols
    gate = tl.load(gate_ptr + cols, mask=mask, other=0).to(tl.float32)
    up = tl.load(gate_ptr + n_cols + cols, mask=mask, other=0)
    # silu in float32, rounded to the activations' dtype before the product, as F.silu(gate) * up does
    out = (gate * tl.sigmoid(gate)).to(up.dtype) * up
    tl.store(out_ptr + row * n_cols + cols, out, mask=mask)


@triton.jit
def _swiglu_packed_backward_kernel(grad_out_ptr, gate_up_ptr, n_cols, BLOCK: tl.constexpr):
    row, cols, mask = _program_block(n_cols, BLOCK)
    gate_ptr = gate_up_ptr + row * 2 * n_cols
    grad_out = tl.load(grad_out_ptr + row * n_cols + cols, mask=mask, other=0).to(tl.float32)
    gate = tl.load(gate_ptr + cols, mask=mask, other=0).to(tl.float32)
    up = tl.load(gate_ptr + n_cols + cols, mask=mask, other=0).to(tl.float32)
    sigmoid = tl.sigmoid(gate)
    silu = gate * sigmoid
    grad_gate = grad_out * up * (sigmoid + silu * (1.0 - sigmoid))
    grad_up = grad_out * silu
    tl.store(gate_ptr + cols, grad_gate.to(gate_up_ptr.dtype.element_ty), mask=mask)
    tl.store(gate_ptr + n_cols + cols, grad_up.to(gate_up_ptr.dtype.element_ty), mask=mask)


def _grid(rows: int, n_cols: int) -> tuple[int, int]:
    return rows, triton.cdiv(n_cols, BLOCK)


class PackedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate_up = gate_up.contiguous()
        n_cols = gate_up.shape[-1] // 2
        out = gate_up.new_empty(*gate_up.shape[:-1], n_cols)
        rows = out.numel() // n_cols
        _swiglu_packed_forward_kernel[_grid(rows, n_cols)](gate_up, out, n_cols, BLOCK=BLOCK)
        ctx.save_for_backward(gate_up)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        n_cols = gate_up.shape[-1] // 2
        rows = grad_out.numel() // n_cols
        _swiglu_packed_backward_kernel[_grid(rows, n_cols)](grad_out, gate_up, n_cols, BLOCK=BLOCK)
        return gate_up  # now the gradient: nothing else reads the projection's output
