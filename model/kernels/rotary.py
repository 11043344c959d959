"""Rotary position embedding on (B, T, H, D) queries and keys, the rotate-half form of HF Llama.

Backends: `torch` (the reference, float32), `liger` (liger-kernel's Triton RoPE; it rotates q and k in place, which
is safe here because nothing else reads the projections' outputs), `flash_attn` (flash-attn's Triton rotary).
"""
import torch

from .hookable import hookable


def rotary_tables(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, D) in float32 for integer positions (B, T).

    Computed on the fly (no buffers) so the model builds under LazyInitContext and Gemini has no buffer to cast.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids.float()[..., None] * inv_freq  # (B, T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, D)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_torch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Reference. q (B, T, H, D), k (B, T, Hkv, D), cos/sin (B, T, D) float32; returns q, k in their dtype."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    q_out = q.float() * cos + _rotate_half(q.float()) * sin
    k_out = k.float() * cos + _rotate_half(k.float()) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


@hookable
def rotary_liger(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    from liger_kernel.ops.rope import LigerRopeFunction

    # Liger takes q/k as (B, H, T, D) views of (B, T, H, D) storage and per-row (B, T, D) tables; it reads the
    # first half of each table row, which ours duplicate. The float32 tables keep the rotation in float32.
    q, k = LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2)


@hookable
def rotary_flash_attn(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    from flash_attn.layers.rotary import apply_rotary_emb

    batch, seq, _, head_dim = q.shape
    # flash-attn's tables are (positions, D/2) shared by the batch. Laid end to end as one sequence of B*T tokens,
    # each token gets its own table row, so per-row positions (restarting with packed documents) carry over.
    # flash-attn wants the tables in the activations' dtype.
    cos = cos.reshape(batch * seq, head_dim)[:, : head_dim // 2].to(q.dtype).contiguous()  # (B*T, D/2)
    sin = sin.reshape(batch * seq, head_dim)[:, : head_dim // 2].to(q.dtype).contiguous()
    q_out = apply_rotary_emb(q.reshape(1, batch * seq, q.shape[2], head_dim), cos, sin)
    k_out = apply_rotary_emb(k.reshape(1, batch * seq, k.shape[2], head_dim), cos, sin)
    return q_out.view(q.shape), k_out.view(k.shape)


BACKENDS = {"torch": rotary_torch, "liger": rotary_liger, "flash_attn": rotary_flash_attn}
REQUIRES = {"liger": ("liger_kernel", "triton"), "flash_attn": ("flash_attn", "triton")}
