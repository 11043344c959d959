"""Triton kernels of the `triton` backend of add_rmsnorm.py; imported only when that backend runs.

Forward: each program takes a tile of rows, writes s = x + residual and y = weight * (s * rstd) (normalised in
float32 and cast back before the scale, Llama's order), and keeps rstd per row for the backward.

Backward: why not Liger's? Its kernel runs one program per SM, each walking its share of rows one at a time, so an
SM holds a single 8-warp program with one row's loads in flight; on an H100 at the 1b shapes that took 431 us per
call, 2.5 times what its memory traffic needs. Here each program takes tiles of several rows and there are several
programs per SM, which keeps enough loads in flight to run at memory bandwidth. Each program sums its rows' weight
gradient in float32; a second kernel adds the per-program sums up (torch's column sum of that (programs, columns)
array took 18 us on an H100, and a cast and autograd's sum into .grad two more kernels). Under gradient accumulation
with in-place sums on (in_place_grads.py) it adds them straight into the weight's .grad, as the projections' GEMMs
do. The stream's incoming gradient (the second output's) is added inside the kernel.
"""
import torch
import triton
import triton.language as tl

from .in_place_grads import grad_to_sum_into

PROGRAMS_PER_SM = 4
# the second stage: each program sums all the partial rows of SUM_COLUMNS columns, SUM_ROWS rows per load
SUM_COLUMNS, SUM_ROWS = 16, 256


def _tile(n_cols: int) -> tuple[int, int]:
    """(columns padded to a power of two, rows per tile): about 8k elements per tile."""
    block_n = triton.next_power_of_2(n_cols)
    return block_n, max(1, 8192 // block_n)


@triton.jit
def _add_rms_norm_forward_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, rstd_ptr, n_rows, n_cols, eps,
                                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols[None, :] < n_cols)
    offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0)
    r = tl.load(r_ptr + offsets, mask=mask, other=0)
    s = (x + r).to(s_ptr.dtype.element_ty)  # rounded as torch's add rounds
    tl.store(s_ptr + offsets, s, mask=mask)
    s32 = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s32 * s32, axis=1) / n_cols + eps)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0)
    y = (s32 * rstd[:, None]).to(s_ptr.dtype.element_ty) * w[None, :]
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_backward_kernel(dy_ptr, ds_ptr, s_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols,
                                  rows_per_program, HAS_DS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_mask, other=0)
    dw = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    start = program * rows_per_program
    for first in range(start, start + rows_per_program, ROWS):
        rows = first + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0)
        s = tl.load(s_ptr + offsets, mask=mask, other=0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0)
        s32 = s.to(tl.float32)
        normed = (s32 * rstd[:, None]).to(s.dtype)
        dw += dy.to(tl.float32) * normed.to(tl.float32)
        m = (dy * w[None, :]).to(tl.float32)  # the gradient of the cast normalised value, rounded as autograd's
        dot = tl.sum(m * s32, axis=1)
        dx = rstd[:, None] * m - (rstd * rstd * rstd * dot / n_cols)[:, None] * s32
        if HAS_DS:
            dx += tl.load(ds_ptr + offsets, mask=mask, other=0).to(tl.float32)
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + program * n_cols + cols, tl.sum(dw, axis=0), mask=col_mask)


@triton.jit
def _sum_partial_rows_kernel(parts_ptr, out_ptr, n_parts, n_cols, ACCUMULATE: tl.constexpr, ROWS: tl.constexpr,
                             COLUMNS: tl.constexpr):
    """out[c] = sum over the parts of parts[p, c] in float32, plus out[c] itself with ACCUMULATE, in out's dtype."""
    cols = tl.program_id(0) * COLUMNS + tl.arange(0, COLUMNS)
    col_mask = cols < n_cols
    total = tl.zeros((COLUMNS,), dtype=tl.float32)
    for first in range(0, n_parts, ROWS):
        parts = first + tl.arange(0, ROWS)
        mask = (parts < n_parts)[:, None] & col_mask[None, :]
        total += tl.sum(tl.load(parts_ptr + parts[:, None] * n_cols + cols[None, :], mask=mask, other=0.0), axis=0)
    if ACCUMULATE:
        total += tl.load(out_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=col_mask)


def _weight_grad(parts: torch.Tensor, weight: torch.Tensor, parameter: torch.Tensor | None) -> torch.Tensor | None:
    """The weight gradient from the backward kernel's per-program sums (programs, n_cols); added into the parameter's
    .grad instead, returning None (nothing for autograd to add), where in_place_grads.grad_to_sum_into allows it."""
    existing = grad_to_sum_into(parameter, weight.dtype)
    out = existing if existing is not None else torch.empty_like(weight, memory_format=torch.contiguous_format)
    n_parts, n_cols = parts.shape
    _sum_partial_rows_kernel[(triton.cdiv(n_cols, SUM_COLUMNS),)](
        parts, out, n_parts, n_cols, ACCUMULATE=existing is not None, ROWS=SUM_ROWS, COLUMNS=SUM_COLUMNS,
        num_warps=8)
    return None if existing is not None else out


class AddRMSNorm(torch.autograd.Function):
    """(x, residual, weight, eps) -> (rms_norm(x + residual) * weight, x + residual), dtypes promoted as torch's."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        shape, n_cols = x.shape, x.shape[-1]
        x, residual = x.reshape(-1, n_cols).contiguous(), residual.reshape(-1, n_cols).contiguous()
        weight = weight.contiguous()
        n_rows = x.shape[0]
        total = torch.empty_like(x, dtype=torch.promote_types(x.dtype, residual.dtype))
        out = torch.empty_like(total, dtype=torch.promote_types(total.dtype, weight.dtype))
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block_n, rows = _tile(n_cols)
        _add_rms_norm_forward_kernel[(triton.cdiv(n_rows, rows),)](
            x, residual, weight, out, total, rstd, n_rows, n_cols, eps, ROWS=rows, BLOCK_N=block_n, num_warps=8)
        ctx.save_for_backward(total, weight, rstd)
        if not torch.compiler.is_compiling():
            ctx.weight = weight  # the parameter itself, for its .grad (a saved tensor unpacks as another)
        ctx.set_materialize_grads(False)  # the stream's gradient may be None (the final norm's unused sum)
        return out.view(shape), total.view(shape)

    @staticmethod
    def backward(ctx, grad_out, grad_total):
        total, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = total.shape
        shape = grad_out.shape if grad_out is not None else grad_total.shape
        grad_out = (grad_out.reshape(-1, n_cols).contiguous() if grad_out is not None
                    else torch.zeros((n_rows, n_cols), dtype=total.dtype, device=total.device))
        if grad_total is not None:
            grad_total = grad_total.reshape(-1, n_cols).contiguous()
        block_n, rows = _tile(n_cols)
        # torch caches the device properties: no driver call per backward
        sms = torch.cuda.get_device_properties(total.device).multi_processor_count
        programs = min(triton.cdiv(n_rows, rows), PROGRAMS_PER_SM * sms)
        rows_per_program = triton.cdiv(triton.cdiv(n_rows, programs), rows) * rows
        programs = triton.cdiv(n_rows, rows_per_program)
        grad_x = torch.empty_like(total)
        grad_weight_parts = torch.empty((programs, n_cols), dtype=torch.float32, device=total.device)
        _add_rms_norm_backward_kernel[(programs,)](
            grad_out, grad_out if grad_total is None else grad_total,  # a placeholder pointer when HAS_DS is off
            total, weight, rstd, grad_x, grad_weight_parts, n_rows, n_cols, rows_per_program,
            HAS_DS=grad_total is not None, ROWS=rows, BLOCK_N=block_n, num_warps=8)
        grad_x = grad_x.view(shape)
        grad_weight = (_weight_grad(grad_weight_parts, weight, getattr(ctx, "weight", None))
                       if ctx.needs_input_grad[2] else None)
        return grad_x, grad_x, grad_weight, None
