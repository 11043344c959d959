"""transformers' LlamaForCausalLM (SDPA attention) behind the suite model's forward, for benchmark.py --baseline hf.

The Trainer runs it through the same plugin, optimizer and loop as the suite's model, so the two throughputs
differ only by the model. What an HF user gets is kept: HF's own forward, then the loss over float32 logits.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from model.config import LlamaConfig, recomputed_layers
from model.llama import compile_each
from model.kernels.loss import IGNORE_INDEX


class HFLlama(nn.Module):
    """forward(input_ids, labels=None, position_ids=None): logits (B, T, V) without labels, else the mean loss.

    Labels are already shifted (labels[b, t] is the target of position t, -100 to ignore), as the suite's model
    takes them; HF's own `labels=` would shift them again. Parameters live under `hf.`, with HF's names after it.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids, labels=None, position_ids=None):
        logits = self.hf(input_ids=input_ids, position_ids=position_ids).logits  # (B, T, V)
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def check_plugin(plugin: str | None) -> None:
    """One clear line for a plugin that cannot run the HF model: hybrid_parallel shards through model/policy.py,
    which knows the suite's model only."""
    if plugin == "hybrid_parallel":
        raise SystemExit("error: --baseline hf with -p hybrid_parallel: its sharding policy (model/policy.py) is for "
                         "the suite's model only; compare under -p ddp, zero2 or gemini")


def check_recomputation(grad_checkpoint: bool | int, num_layers: int) -> None:
    """transformers' activation checkpointing recomputes every layer or none, so -g LAYERS has no HF counterpart."""
    if recomputed_layers(grad_checkpoint, num_layers) not in (0, num_layers):
        raise SystemExit(f"error: --baseline hf with -g {grad_checkpoint}: transformers' activation checkpointing "
                         f"recomputes every layer or none; use -g alone, or no -g")


def build_hf_model(args: argparse.Namespace, config: LlamaConfig, kernels=None) -> HFLlama:
    """A Trainer model_builder. `kernels` (the suite's) do not apply: HF attends with SDPA and its own ops.

    Built eagerly, on this GPU when there is one, not under the plugin's LazyInitContext: transformers 5's Llama
    does not materialise there under Gemini (RecursionError on its rotary buffer). So the whole fp32 model must fit
    on one GPU before the plugin shards it (13B does on 80 GiB, 70B does not). -g and --compile apply as they
    do to the suite's model: HF's activation checkpointing, torch.compile of each decoder layer.
    """
    import transformers

    # use_cache=False: a training step keeps no key-value cache
    hf_config = transformers.LlamaConfig(**config.to_hf_dict(), attn_implementation="sdpa", use_cache=False)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    with device:
        model = transformers.LlamaForCausalLM(hf_config)
    if args.grad_checkpoint:
        model.activation_checkpointing_enable()
    if args.compile:
        compile_each(model.model.layers)
    return HFLlama(model)
