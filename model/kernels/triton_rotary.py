"""Triton kernel of the `triton` backend of qkv_rotary.py; imported only when that backend runs.

One launch per direction, two programs per token: one rotates the token's q heads, the other its k heads and moves
its v row unrotated. Each loads its heads as a (heads, D/2) tile for each half of the head dimension, rotates them in
float32 with the token's cos/sin row, and stores them to a tensor of its own row stride. The forward reads from the
projection's output (row stride (H + 2 Hkv) D) into q, k and v; the backward runs the inverse rotation from dq and dk,
and moves dv, into the projection's gradient. Moving v inside saves torch's strided copy, whose kernel runs
unvectorised at a fraction of memory bandwidth (1.1 ms per 1b micro-batch of 16 x 2048 tokens on an H100); doing q
and k in one launch saves a launch per layer and direction (the host's time, at small micro batches).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _head_tile(n_heads, HALF: tl.constexpr, HEADS: tl.constexpr):
    """Offsets of the first half of each head of one token, (HEADS, HALF), and which heads exist."""
    heads = tl.arange(0, HEADS)[:, None]
    return heads * (2 * HALF) + tl.arange(0, HALF)[None, :], heads < n_heads


@triton.jit
def _rotate_heads(src, dst, cos_ptr, sin_ptr, row, n_heads, HALF: tl.constexpr, HEADS: tl.constexpr,
                  INVERSE: tl.constexpr):
    """dst = src cos + rotate_half(src) sin for each head of token `row` (HF Llama's form); INVERSE: its transpose."""
    offsets, mask = _head_tile(n_heads, HALF, HEADS)
    x1 = tl.load(src + offsets, mask=mask, other=0).to(tl.float32)
    x2 = tl.load(src + HALF + offsets, mask=mask, other=0).to(tl.float32)
    table = row * (2 * HALF) + tl.arange(0, HALF)[None, :]  # the (B, T, D) tables' row of this token
    cos1, cos2 = tl.load(cos_ptr + table), tl.load(cos_ptr + HALF + table)
    sin1, sin2 = tl.load(sin_ptr + table), tl.load(sin_ptr + HALF + table)
    if INVERSE:  # dx1 = g1 cos1 + g2 sin2, dx2 = g2 cos2 - g1 sin1
        y1, y2 = x1 * cos1 + x2 * sin2, x2 * cos2 - x1 * sin1
    else:  # y1 = x1 cos1 - x2 sin1, y2 = x2 cos2 + x1 sin2
        y1, y2 = x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2
    tl.store(dst + offsets, y1.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + HALF + offsets, y2.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _move_heads(src, dst, n_heads, HALF: tl.constexpr, HEADS: tl.constexpr):
    offsets, mask = _head_tile(n_heads, HALF, HEADS)
    for half in tl.static_range(2):
        tl.store(dst + half * HALF + offsets, tl.load(src + half * HALF + offsets, mask=mask, other=0), mask=mask)


@triton.jit
def _qkv_rotary_kernel(q_src, q_src_stride, q_dst, q_dst_stride, k_src, k_src_stride, k_dst, k_dst_stride,
                       v_src, v_src_stride, v_dst, v_dst_stride, cos_ptr, sin_ptr, n_heads, n_kv_heads,
                       HALF: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, INVERSE: tl.constexpr):
    """Program (token, 0) rotates the token's q heads; program (token, 1) its k heads, and moves its v heads."""
    row = tl.program_id(0).to(tl.int64)
    if tl.program_id(1) == 0:
        _rotate_heads(q_src + row * q_src_stride, q_dst + row * q_dst_stride, cos_ptr, sin_ptr, row, n_heads,
                      HALF, HEADS, INVERSE)
    else:
        _rotate_heads(k_src + row * k_src_stride, k_dst + row * k_dst_stride, cos_ptr, sin_ptr, row, n_kv_heads,
                      HALF, KV_HEADS, INVERSE)
        _move_heads(v_src + row * v_src_stride, v_dst + row * v_dst_stride, n_kv_heads, HALF, KV_HEADS)


def _rotate_qkv(src: tuple, dst: tuple, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int,
                head_dim: int, inverse: bool) -> None:
    """Rotate src's q and k into dst's and move v, for (rows, heads x head_dim) matrices of any row stride whose heads
    are contiguous: src = (q, k, v), dst likewise."""
    rows = cos.numel() // head_dim
    strided = [arg for pair in zip(src, dst) for t in pair for arg in (t, t.stride(-2))]
    _qkv_rotary_kernel[(rows, 2)](*strided, cos, sin, n_heads, n_kv_heads, HALF=head_dim // 2,
                                  HEADS=triton.next_power_of_2(n_heads), KV_HEADS=triton.next_power_of_2(n_kv_heads),
                                  INVERSE=inverse)


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
        _rotate_qkv(rows.split([q_width, kv_width, kv_width], dim=1),
                    (q.view(-1, q_width), k.view(-1, kv_width), v.view(-1, kv_width)),
                    cos, sin, n_heads, n_kv_heads, head_dim, inverse=False)
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
        grads = (grad_q.reshape(batch * seq, q_width), grad_k.reshape(batch * seq, kv_width),
                 grad_v.reshape(batch * seq, kv_width))
        _rotate_qkv(grads, grad.view(batch * seq, -1).split([q_width, kv_width, kv_width], dim=1),
                    cos, sin, n_heads, n_kv_heads, head_dim, inverse=True)
        return grad, None, None, None, None
