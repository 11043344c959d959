"""Next-token loss from the final hidden states and the LM head weight.

Taking (hidden, weight) rather than logits lets a fused backend never hold the full (N, vocab) logits.
Labels are already shifted (labels[i] is the target for position i); -100 is ignored. The loss is the mean
over the labelled tokens of the micro-batch.
"""
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def linear_cross_entropy_torch(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Reference. hidden (N, d), weight (V, d), labels (N,). Cross-entropy in float32."""
    logits = F.linear(hidden, weight).float()  # (N, V)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


BACKENDS = {"torch": linear_cross_entropy_torch}
