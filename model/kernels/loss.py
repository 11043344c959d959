"""Next-token loss from the final hidden states and the LM head weight.

Taking (hidden, weight) rather than logits lets a fused backend never hold the full (N, vocab) logits.
Labels are already shifted (labels[i] is the target for position i); -100 is ignored. The loss is the mean
over the labelled tokens of the micro-batch.

Backends:
  torch       the reference: full logits, float32 cross-entropy.
  triton      this suite's fused linear + cross-entropy (triton_cross_entropy.py): Liger's chunked scheme without its
              two waits for the GPU per call; the mean's division happens on the device.
  liger       liger-kernel's fused linear + cross-entropy: logits in chunks of tokens (LIGER_CHUNK_MEM_CONST), gradients
              computed in the forward, no float32 copy of the logits. Weight gradient accumulated in float32.
  liger_ce    full logits, liger-kernel's Triton cross-entropy (no float32 copy of the logits).
  flash_attn  full logits, flash-attn's Triton cross-entropy.
"""
import torch
import torch.nn.functional as F

from .hookable import hookable

IGNORE_INDEX = -100
# Liger's loop holds the logits of one chunk of tokens at a time, at most chunk_mem_const x (tokens x hidden)
# elements. Its default of 1 cut a 1b micro-batch of 16 x 2048 tokens into 16 chunks of 2048, and every chunk read and
# wrote the whole float32 weight-gradient accumulator (vocab x hidden) again. With 16 that micro-batch is one chunk:
# 2 GiB of bf16 logits instead of 0.12 GiB, 23.7 -> 21.6 ms for the loss's forward and backward on an H100, and 1%
# more tokens/s for 1b with zero2 (75.3k -> 76.1k, 16 x 16 on one H100). 7b at 2 x 4096 tokens also takes one chunk
# (0.5 GiB); a larger vocabulary than hidden x 16 still splits.
LIGER_CHUNK_MEM_CONST = 16


def fused_chunk_rows(rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk of the fused linear cross-entropies (Liger's arithmetic, which the triton backend and the memory
    planner share): a power of two, so that a chunk's logits hold about LIGER_CHUNK_MEM_CONST x (rows x hidden)
    elements at most."""
    chunks = -(-vocab // (LIGER_CHUNK_MEM_CONST * hidden))
    return min(rows, 1 << (-(-rows // chunks) - 1).bit_length())  # the next power of two


def linear_cross_entropy_torch(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Reference. hidden (N, d), weight (V, d), labels (N,). Cross-entropy in float32."""
    logits = F.linear(hidden, weight).float()  # (N, V)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


@hookable
def linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from .triton_cross_entropy import LinearCrossEntropySum

    # gradients in the forward only when a backward can follow (an evaluation's hidden states need none)
    loss_sum = LinearCrossEntropySum.apply(hidden, weight, labels, IGNORE_INDEX, torch.is_grad_enabled())
    return loss_sum / (labels != IGNORE_INDEX).sum()


@hookable
def linear_cross_entropy_liger(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(
        hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="mean", accum_dtype=torch.float32,
        chunk_mem_const=LIGER_CHUNK_MEM_CONST,
    )


@hookable
def linear_cross_entropy_liger_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_cross_entropy

    return liger_cross_entropy(F.linear(hidden, weight), labels, ignore_index=IGNORE_INDEX, reduction="mean")


@hookable
def linear_cross_entropy_flash_attn(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    losses, _ = cross_entropy_loss(F.linear(hidden, weight), labels, ignore_index=IGNORE_INDEX)  # (N,), 0 if ignored
    return losses.sum() / (labels != IGNORE_INDEX).sum()


BACKENDS = {
    "torch": linear_cross_entropy_torch,
    "triton": linear_cross_entropy_triton,
    "liger": linear_cross_entropy_liger,
    "liger_ce": linear_cross_entropy_liger_ce,
    "flash_attn": linear_cross_entropy_flash_attn,
}
REQUIRES = {
    "triton": ("triton",),
    "liger": ("liger_kernel", "triton"),
    "liger_ce": ("liger_kernel", "triton"),
    "flash_attn": ("flash_attn", "triton"),
}
