"""Causal self-attention on (B, T, H, D) tensors, optionally document-causal for packed sequences.

`doc_ids` (B, T) numbers the documents of a packed row; a token attends only to earlier tokens of its own
document. None means one causal sequence per row. Keys and values may have fewer heads (grouped-query).

Backends:
  math              the reference: explicit scores and float32 softmax.
  sdpa              PyTorch's scaled_dot_product_attention, backend of PyTorch's choosing; packed rows pass a
                    dense (B, 1, T, T) boolean mask.
  sdpa_cudnn        SDPA forced onto its cuDNN backend (a fast path on Hopper). bf16/fp16 only.
  sdpa_flash        SDPA forced onto its flash backend. bf16/fp16 only.
  flex              FlexAttention with a block mask built from doc_ids, compiled once: it skips the blocks that
                    cross documents instead of masking them.
  flash_attn        the flash-attn package: flash_attn_func, or flash_attn_varlen_func for packed rows.
  flash_attn_varlen the flash-attn package's varlen kernel for every row (a row without doc_ids is one sequence).
  flash_attn4       FlashAttention-4, the flash-attn-4 package's CuTe kernels (`flash_attn.cute`; Hopper and
                    Blackwell): its causal kernel, or its varlen kernel for packed rows. On an H100 at the 1b shape
                    (16 x 2048, 32 heads of 64, 4 key/value heads) forward + backward took 2.67 ms against cuDNN's
                    3.10-3.20 ms: the same forward, a backward at 340 TFLOPS against cuDNN's 275.

sdpa_cudnn and sdpa_flash cover plain causal rows only: SDPA's flash backend takes no mask, and cuDNN would need the
dense (B, T, T) one. Packed rows (doc_ids given) therefore go to `flex`, which is document-causal without a dense
mask; the choice is this table's, made once here, not a fallback at run time.
"""
from __future__ import annotations

import sys
import weakref

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .hookable import hookable, plain


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


# ---- SDPA on a chosen backend ------------------------------------------------------------------------------
def _sdpa_on(backend: SDPBackend, q, k, v):
    groups = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
    return out.transpose(1, 2)


def attention_sdpa_cudnn(q, k, v, doc_ids=None):
    """SDPA's cuDNN backend for causal rows; packed rows go to `flex` (see module doc)."""
    if doc_ids is not None:
        return attention_flex(q, k, v, doc_ids)
    return _sdpa_on(SDPBackend.CUDNN_ATTENTION, q, k, v)


def attention_sdpa_flash(q, k, v, doc_ids=None):
    """SDPA's flash backend for causal rows; packed rows go to `flex` (see module doc)."""
    if doc_ids is not None:
        return attention_flex(q, k, v, doc_ids)
    return _sdpa_on(SDPBackend.FLASH_ATTENTION, q, k, v)


# ---- FlexAttention -----------------------------------------------------------------------------------------
class _PerBatch:
    """Caches `build(doc_ids)` for the doc_ids tensor of the current forward.

    Every layer, and a recomputing activation checkpoint, receives the same doc_ids object, so the mask (or the
    varlen offsets) is built once per micro-batch instead of once per layer. A weak reference: nothing is kept alive.
    """

    def __init__(self, build):
        self.build = build
        self.key = None
        self.value = None

    def __call__(self, doc_ids):
        if self.key is None or self.key() is not doc_ids:
            self.value = self.build(doc_ids)
            self.key = weakref.ref(doc_ids)
        return self.value


def _document_block_mask(doc_ids):
    from torch.nn.attention.flex_attention import create_block_mask

    doc_ids = plain(doc_ids)

    def document_causal(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

    batch, seq = doc_ids.shape
    return create_block_mask(document_causal, batch, None, seq, seq, device=doc_ids.device)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


_flex_document_mask = _PerBatch(_document_block_mask)
_flex_causal_masks: dict = {}  # (seq, device) -> block mask, shared by every batch and head
_flex_compiled = None


def _causal_block_mask(seq: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    key = (seq, str(device))
    if key not in _flex_causal_masks:
        _flex_causal_masks[key] = create_block_mask(_causal, None, None, seq, seq, device=device)
    return _flex_causal_masks[key]


def _flex_attention(q, k, v, block_mask):
    """flex_attention, compiled once for CUDA (uncompiled it is slow and uses memory like the math path)."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if not q.is_cuda:
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def attention_flex(q, k, v, doc_ids=None):
    """FlexAttention, document-causal from a block mask. CPU: forward only (PyTorch has no CPU flex backward)."""
    block_mask = _causal_block_mask(q.shape[1], q.device) if doc_ids is None else _flex_document_mask(doc_ids)
    # Compiled code is handed plain tensors: Gemini's activations are ColoTensors, which dynamo would trace into.
    q, k, v = (plain(t).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    return _flex_attention(q, k, v, block_mask).transpose(1, 2)


# ---- flash-attn package ------------------------------------------------------------------------------------
def varlen_offsets(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32, number of documents + 1) and the longest document, over the (B*T) flattened tokens.

    A document starts where doc_ids changes and at the start of every row (ids restart per row).
    """
    batch, seq = doc_ids.shape
    flat = doc_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::seq] = True
    boundaries = torch.cat([starts.nonzero().reshape(-1), flat.new_tensor([batch * seq])])
    cu_seqlens = boundaries.to(torch.int32)
    return cu_seqlens, int((boundaries[1:] - boundaries[:-1]).max())


_varlen_offsets = _PerBatch(varlen_offsets)


def row_offsets(batch: int, seq: int, device) -> tuple[torch.Tensor, int]:
    """varlen_offsets when each row is one sequence, from the shape alone: varlen_offsets would read its longest
    document back from the GPU, a host synchronisation in every layer's forward."""
    return torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=device), seq


@hookable
def attention_flash_attn_varlen(q, k, v, doc_ids=None):
    from flash_attn import flash_attn_varlen_func

    def causal_per_document(q, k, v, cu_seqlens, max_len):
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, causal=True)

    return over_documents(causal_per_document, q, k, v, doc_ids)


def over_documents(varlen_attention, q, k, v, doc_ids=None):
    """A varlen kernel on the (B*T) flattened tokens, each document (each row, without doc_ids) its own sequence:
    varlen_attention(q, k, v, cu_seqlens, max_len) on (B*T, heads, D) tensors; (B, T, H, D) in and out."""
    batch, seq, heads, head_dim = q.shape
    if doc_ids is None:
        cu_seqlens, max_len = row_offsets(batch, seq, q.device)
    else:
        cu_seqlens, max_len = _varlen_offsets(doc_ids)
    q, k, v = (t.reshape(batch * seq, t.shape[2], head_dim) for t in (q, k, v))  # (B*T, heads, D)
    return varlen_attention(q, k, v, cu_seqlens, max_len).view(batch, seq, heads, head_dim)


@hookable
def attention_flash_attn(q, k, v, doc_ids=None):
    from flash_attn import flash_attn_func

    if doc_ids is not None:
        return attention_flash_attn_varlen(q, k, v, doc_ids)
    return flash_attn_func(q, k, v, causal=True)  # (B, T, H, D) in and out; grouped-query natively


# ---- FlashAttention-4 (flash-attn-4 package) ----------------------------------------------------------------
@hookable
def attention_flash_attn4(q, k, v, doc_ids=None):
    """(B, T, H, D) in and out, grouped-query natively; packed rows through the varlen kernel on flattened tokens."""
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

    if not _cutlass_argv_guarded:
        guard_cutlass_against_our_flags()
    if doc_ids is None:
        return flash_attn_func(q, k, v, causal=True)[0]  # (out, log-sum-exp or None)

    def causal_per_document(q, k, v, cu_seqlens, max_len):
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                      max_seqlen_q=max_len, max_seqlen_k=max_len, causal=True)[0]

    return over_documents(causal_per_document, q, k, v, doc_ids)


_cutlass_argv_guarded = False


def guard_cutlass_against_our_flags() -> None:
    """Make CuTe DSL read only its own exact `-diagnostic` flag from the command line.

    Why: CuTe DSL, which compiles flash-attn-4's kernels, parses sys.argv for `-diagnostic` each time it compiles one
    (nvidia-cutlass-dsl 4.8.1, cutlass/base_dsl/dsl.py `diagnostic`), with argparse, which takes any single-dash
    prefix of an option for that option: pretrain.py's `-d /data/corpus` became `-diagnostic /data/corpus`, and the
    run exited with "invalid choice" at its first forward. Its parser is built once and cached; that instance is given
    the `-diagnostic` tokens alone, so the flag itself still works.
    """
    global _cutlass_argv_guarded
    try:
        from cutlass.base_dsl import dsl
        parser = dsl._get_diagnostic_arg_parser()
    except (ImportError, AttributeError):  # another version of CuTe DSL, without that parser
        _cutlass_argv_guarded = True
        return
    parse_known_args = parser.parse_known_args
    parser.parse_known_args = lambda args=None, namespace=None: parse_known_args(
        diagnostic_tokens(sys.argv[1:] if args is None else args), namespace)
    _cutlass_argv_guarded = True


def diagnostic_tokens(argv: list[str]) -> list[str]:
    """The exact `-diagnostic` flags in `argv`, each with its value where one follows."""
    kept = []
    for index, token in enumerate(argv):
        if token.startswith("-diagnostic="):
            kept.append(token)
        elif token == "-diagnostic":
            kept.append(token)
            if index + 1 < len(argv) and not argv[index + 1].startswith("-"):
                kept.append(argv[index + 1])
    return kept


BACKENDS = {
    "math": attention_math,
    "sdpa": attention_sdpa,
    "sdpa_cudnn": attention_sdpa_cudnn,
    "sdpa_flash": attention_sdpa_flash,
    "flex": attention_flex,
    "flash_attn": attention_flash_attn,
    "flash_attn_varlen": attention_flash_attn_varlen,
    "flash_attn4": attention_flash_attn4,
}
# Backends without a float32 kernel; `auto` leaves them out of a run that trains in float32 (kernels/__init__.py).
HALF_PRECISION_ONLY = ("sdpa_cudnn", "sdpa_flash", "flash_attn", "flash_attn_varlen", "flash_attn4")
# Python packages each backend needs beyond torch.
REQUIRES = {"flash_attn": ("flash_attn",), "flash_attn_varlen": ("flash_attn",), "flash_attn4": ("flash_attn.cute",)}
