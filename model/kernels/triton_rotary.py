"""Triton kernel of the `triton` backend of qkv_rotary.py; imported only when that backend runs.

One program per token and per part (q or k): it loads the part's heads as a (heads, D/2) tile for each half of the
head dimension, rotates them in float32 with the token's cos/sin row, and stores them to a tensor of its own row
stride. The forward reads from the projection's output (row stride (H + 2 Hkv) D) into q and k; the backward runs
the inverse rotation from dq and dk into the projection's gradient. v needs no rotation: a strided copy moves it.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads_kernel(src_ptr, src_row_stride, dst_ptr, dst_row_stride, cos_ptr, sin_ptr, n_heads,
                         HALF: tl.constexpr, HEADS: tl.constexpr, INVERSE: tl.constexpr):
    """out = x cos + rotate_half(x) sin for each head of one token (HF Llama's form); INVERSE: its transpose."""
    row = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, HEADS)[:, None]
    cols = tl.arange(0, HALF)[None, :]
    mask = heads < n_heads
    offsets = heads * (2 * HALF) + cols
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
            head_dim: int, inverse: bool) -> None:
    """Rotate n_heads heads per row of src (rows of any stride, heads contiguous) into dst."""
    rows = cos.numel() // head_dim
    _rotate_heads_kernel[(rows,)](src, src.stride(-2), dst, dst.stride(-2), cos, sin, n_heads,
                                  HALF=head_dim // 2, HEADS=triton.next_power_of_2(n_heads), INVERSE=inverse)


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
        k = qkv.new_empty(batch, seq, n_kv_heads, head_dim)
        q_width, kv_width = n_heads * head_dim, n_kv_heads * head_dim
        _rotate(rows, q.view(-1, q_width), cos, sin, n_heads, head_dim, inverse=False)
        _rotate(rows[:, q_width:], k.view(-1, kv_width), cos, sin, n_kv_heads, head_dim, inverse=False)
        v = rows[:, q_width + kv_width:].view(batch, seq, n_kv_heads, head_dim).contiguous()
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
                inverse=True)
        rows[:, q_width + kv_width:].copy_(grad_v.reshape(batch * seq, kv_width))
        return grad, None, None, None, None
