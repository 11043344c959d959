"""Triton kernel of the `triton` backend of qkv_rotary.py; imported only when that backend runs.

One program per token and per part (q or k): it loads the part's heads as a (heads, D/2) tile for each half of the
head dimension, rotates them in float32 with the token's cos/sin row, and stores them to a tensor of its own row
stride. The forward reads from the projection's output (row stride (H + 2 Hkv) D) into q and k; the backward runs
the inverse rotation from dq and dk into the projection's gradient. v needs no rotation: the programs rotating k
also move v's row (forward: out of the projection's output; backward: into its gradient), which saves a launch and
torch's strided copy, whose kernel runs unvectorised at a fraction of memory bandwidth (1.1 ms per 1b micro-batch
of 16 x 2048 tokens on an H100).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads_kernel(src_ptr, src_row_stride, dst_ptr, dst_row_stride, cos_ptr, sin_ptr, n_heads,
                         copy_src_ptr, copy_src_row_stride, copy_dst_ptr, copy_dst_row_stride,
                         HALF: tl.constexpr, HEADS: tl.constexpr, INVERSE: tl.constexpr, COPY: tl.constexpr):
    """out = x cos + rotate_half(x) sin for each head of one token (HF Llama's form); INVERSE: its transpose.
    COPY: also copy n_heads heads of this token from copy_src to copy_dst, unrotated (v)."""
    row = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, HEADS)[:, None]
    cols = tl.arange(0, HALF)[None, :]
    mask = heads < n_heads
    offsets = heads * (2 * HALF) + cols
    if COPY:
        for half in tl.static_range(2):
            moved = tl.load(copy_src_ptr + row * copy_src_row_stride + half * HALF + offsets, mask=mask, other=0)
            tl.store(copy_dst_ptr + row * copy_dst_row_stride + half * HALF + offsets, moved, mask=mask)
    x1 = tl.load(src_ptr + row * src_row_stride + offsets, mask=mask, other=0).to(tl.float32)
    x2 = tl.load(src_ptr + row * src_row_stride + HALF + offsets, mask=mask, other=0).to(tl.float32)
    table = row * (2 * HALF) + cols  # the (B, T, D) tables' row of this token
    cos1, cos2 = tl.load(cos_ptr + table), tl.load(cos_ptr + HALF + table)
    sin1, sin2 = tl.load(sin_ptr + table), tl.load(sin_ptr + HALF + table)
    if INVERSE:  # dx1 = g1 cos1 + g2 sin2, dx2 = g2 cos2 - g1 sin1
        y1, y2 = x1 * cos1 + x2 * sin2, x2 * cos2 - x1 * sin1
    else:  # y1 = x1 cos1 - x2 sin1, y2 = x2 cos2 + x1 sin2
        y1, y2 = x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2
    out = dst_ptr + row * dst_row_stride + offsets
    tl.store(out, y1.to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(out + HALF, y2.to(dst_ptr.dtype.element_ty), mask=mask)


def _rotate(src: torch.Tensor, dst: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int,
            head_dim: int, inverse: bool, copy: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Rotate n_heads heads per row of src (rows of any stride, heads contiguous) into dst; with copy = (from, to),
    also copy n_heads heads per row between those two (rows of any stride)."""
    rows = cos.numel() // head_dim
    copy_src, copy_dst = copy if copy is not None else (src, dst)  # unused without COPY
    _rotate_heads_kernel[(rows,)](src, src.stride(-2), dst, dst.stride(-2), cos, sin, n_heads,
                                  copy_src, copy_src.stride(-2), copy_dst, copy_dst.stride(-2),
                                  HALF=head_dim // 2, HEADS=triton.next_power_of_2(n_heads), INVERSE=inverse,
                                  COPY=copy is not None)


class QKVRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int):
        batch, seq, width = qkv.shape
        head_dim = width // (n_heads + 2 * n_kv_heads)
        if head_dim % 2 or head_dim & (head_dim - 1):
            raise ValueError(f"qkv_rotary triton: head dimension {head_dim} is not a power of two")
        rows = qkv.reshape(batch * seq, width)  # a view: the projection's output is contiguous
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        q = qkv.new_empty(batch, seq, n_heads, head_dim)
        k, v = (qkv.new_empty(batch, seq, n_kv_heads, head_dim) for _ in range(2))
        q_width, kv_width = n_heads * head_dim, n_kv_heads * head_dim
        _rotate(rows, q.view(-1, q_width), cos, sin, n_heads, head_dim, inverse=False)
        _rotate(rows[:, q_width:], k.view(-1, kv_width), cos, sin, n_kv_heads, head_dim, inverse=False,
                copy=(rows[:, q_width + kv_width:], v.view(-1, kv_width)))
        ctx.save_for_backward(cos, sin)
        ctx.shape = (n_heads, n_kv_heads, head_dim)
        return q, k, v

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor):
        cos, sin = ctx.saved_tensors
        n_heads, n_kv_heads, head_dim = ctx.shape
        batch, seq = grad_q.shape[:2]
        q_width, kv_width = n_heads * head_dim, n_kv_heads * head_dim
        grad = grad_q.new_empty(batch, seq, q_width + 2 * kv_width)
        rows = grad.view(batch * seq, -1)
        _rotate(grad_q.reshape(batch * seq, q_width), rows, cos, sin, n_heads, head_dim, inverse=True)
        _rotate(grad_k.reshape(batch * seq, kv_width), rows[:, q_width:], cos, sin, n_kv_heads, head_dim,
                inverse=True, copy=(grad_v.reshape(batch * seq, kv_width), rows[:, q_width + kv_width:]))
        return grad, None, None, None, None
