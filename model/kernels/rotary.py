"""Rotary position embedding on (B, T, H, D) queries and keys, the rotate-half form of HF Llama."""
import torch


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


BACKENDS = {"torch": rotary_torch}
