"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 as Llama does."""
import torch


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference. Normalises in float32, casts back, then scales (the order transformers' Llama uses)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


BACKENDS = {"torch": rms_norm_torch}
