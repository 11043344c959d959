"""Causal self-attention on (B, T, H, D) tensors, optionally document-causal for packed sequences.

`doc_ids` (B, T) numbers the documents of a packed row; a token attends only to earlier tokens of its own
document. None means one causal sequence per row.
"""
import torch
import torch.nn.functional as F


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document index of each token: a new document starts wherever its position is 0."""
    return (position_ids == 0).cumsum(dim=-1)


def attention_math(q, k, v, doc_ids=None):
    """Reference. q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D). Explicit float32 softmax."""
    batch, seq, heads, head_dim = q.shape
    groups = heads // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / head_dim**0.5  # (B, H, T, T)
    scores = scores.masked_fill(~_allowed(seq, doc_ids, q.device), float("-inf"))
    out = scores.softmax(dim=-1) @ v.float()  # (B, H, T, D)
    return out.to(q.dtype).transpose(1, 2)


def attention_sdpa(q, k, v, doc_ids=None):
    """PyTorch scaled_dot_product_attention; the backend (flash, cuDNN, efficient, math) is PyTorch's choice."""
    groups = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if doc_ids is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
    else:
        mask = _allowed(q.shape[2], doc_ids, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=groups > 1)
    return out.transpose(1, 2)


def _allowed(seq: int, doc_ids, device) -> torch.Tensor:
    """Boolean mask, True where attention is allowed: (T, T) causal, or (B, 1, T, T) document-causal."""
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    if doc_ids is None:
        return causal
    same_doc = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
    return same_doc & causal


BACKENDS = {"math": attention_math, "sdpa": attention_sdpa}
