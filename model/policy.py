"""Colossal-AI shardformer policy for the suite's Llama (model/llama.py): tensor, pipeline and sequence parallelism.

`HybridParallelPlugin(custom_policy=LlamaPolicy(...))` applies it when boosting; training/plugins.py builds both.
colossalai's own Llama policy is written for transformers' classes (and fails to import on transformers 5), so this
one names the suite's modules. Parameter names stay those of Hugging Face checkpoints: colossalai's parallel layers
gather their shards (and drop vocabulary padding) when saving, so a checkpoint saved under one layout loads under any.

Tensor parallelism (Megatron style, over the plugin's tp group):
  attention   q_proj column-parallel: each rank keeps n_heads / tp query heads. k_proj and v_proj column-parallel
              when tp divides the key-value heads; when tp is a multiple of them instead, every rank keeps the whole
              projection and uses the one head its query heads share (ReplicatedKVProjection). o_proj row-parallel.
              The Attention modules' head counts are replaced by the per-rank counts.
  MLP         gate_proj, up_proj column-parallel, down_proj row-parallel; SwiGLU runs on the local columns.
  vocabulary  embedding and LM head split by vocabulary rows (padded to a multiple of make_vocab_size_divisible_by
              x tp). The loss kernel is replaced by `vocab_parallel_cross_entropy`, colossalai's distributed
              cross-entropy on this rank's logits: nobody holds the full-vocabulary logits. The other kernels
              (attention, RMSNorm, rotary, SwiGLU) act on local heads, columns or whole tokens and run unchanged.
Sequence parallelism (split_gather or ring, over the tp group): between the tensor-parallel regions each rank holds
  a slice of the sequence; the column linears gather it, the row linears reduce-scatter it back, the embedding
  output is split and the final norm's output gathered. Norm weights then get partial gradients, which the plugin
  all-reduces (they are marked for it).
Pipeline parallelism: layers split evenly over stages (or `layers_per_stage`), with interleaved model chunks; the
  model's `pipeline_stage` tells its forward which layers to run, the first stage embeds, the last norms and
  computes the loss, and the stages between pass {"hidden_states": ...}.
"""
from __future__ import annotations

import dataclasses
import zlib
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from colossalai.lazy import LazyInitContext
from colossalai.lazy.lazy_init import LazyTensor
from colossalai.shardformer.layer import (
    Linear1D_Col,
    Linear1D_Row,
    ParallelModule,
    VocabParallelEmbedding1D,
    VocabParallelLMHead1D,
    cross_entropy_1d,
)
from colossalai.shardformer.layer._operation import (
    gather_forward_split_backward,
    reduce_backward,
    split_forward_gather_backward,
)
from colossalai.shardformer.layer.utils import SeqParallelUtils
from colossalai.shardformer.policies.base_policy import ModulePolicyDescription, Policy, SubModuleReplacementDescription

from .kernels.loss import IGNORE_INDEX
from .llama import MLP, Attention, LlamaForCausalLM, LlamaModel, RMSNorm

# the sequence-parallel modes that share the tp group; all_to_all and ring_attn would need their own attention
SEQUENCE_PARALLEL_MODES = ("split_gather", "ring")


class ShardingError(ValueError):
    """A layout this policy cannot shard the model into; the message names the sizes that do not fit."""


class PipelineStage:
    """What one pipeline rank runs, as LlamaForCausalLM.pipeline_stage: its layer ranges (one per model chunk) and
    whether the chunk running now is the first or the last of the pipeline. The interleaved schedule sets
    `stage_manager.model_chunk_id` before each forward."""

    def __init__(self, stage_manager, layer_ranges: list[tuple[int, int]]):
        self.stage_manager = stage_manager
        self.layer_ranges = layer_ranges

    def is_first(self) -> bool:
        return self.stage_manager.is_first_stage()

    def is_last(self) -> bool:
        return self.stage_manager.is_last_stage()

    def layers(self) -> slice:
        chunk = self.stage_manager.model_chunk_id if self.stage_manager.is_interleave else 0
        return slice(*self.layer_ranges[chunk])


def stage_layer_ranges(layers_per_stage: list[int], stage: int, num_stages: int) -> list[tuple[int, int]]:
    """The [start, end) layer range of each model chunk of `stage`; layers_per_stage has num_stages x chunks entries,
    chunk c of stage s being entry c * num_stages + s (the interleaved order: the model loops over the stages)."""
    bounds = [0]
    for count in layers_per_stage:
        bounds.append(bounds[-1] + count)
    return [(bounds[i], bounds[i + 1]) for i in range(stage, len(layers_per_stage), num_stages)]


def vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                 process_group, vocab_size: int) -> torch.Tensor:
    """The loss kernel under tensor parallelism: mean cross-entropy over labels != -100, as loss.py's reference.

    hidden (N, d), the same on every rank of `process_group`; weight (V_padded / tp, d), this rank's rows of the
    vocabulary-parallel LM head; labels (N,). Each rank computes only its slice of the logits, in float32, and
    colossalai's DistCrossEntropy combines the slices' max, sum of exponentials and target logit by all-reduce.
    """
    rows, rank = weight.shape[0], dist.get_rank(process_group)
    valid = max(0, min(rows, vocab_size - rank * rows))  # the padding rows past the vocabulary are no logits
    hidden = reduce_backward(hidden, process_group)  # each rank's logits give one part of d loss / d hidden
    logits = F.linear(hidden, weight[:valid]).float()  # (N, valid)
    # vocab_size tells DistCrossEntropy each rank's offset, rank x rows: the padded size, not the true one
    loss_sum = cross_entropy_1d(logits, labels, ignore_index=IGNORE_INDEX, process_group=process_group,
                                vocab_size=rows * dist.get_world_size(process_group), dtype=torch.float32, mode="sum")
    return loss_sum / (labels != IGNORE_INDEX).sum()


class ReplicatedKVProjection(ParallelModule):
    """k_proj or v_proj when tp is a multiple of the key-value heads: each rank's query heads share one kv head.

    Every rank keeps the whole weight (replicated, so checkpoints hold it once, unchanged) and computes only its
    head. Its gradient covers that head's rows alone, so the weight's gradient is summed over the tp group, which
    gives every rank the full and identical gradient; the input's gradient is summed as a column-parallel layer's.
    """

    def __init__(self, weight: nn.Parameter, head: int, head_dim: int, process_group):
        super().__init__()
        self.weight = weight
        self.rows = slice(head * head_dim, (head + 1) * head_dim)
        self.process_group = process_group

    @staticmethod
    def from_native_module(module: nn.Linear, process_group, head_dim: int, kv_heads: int) -> ReplicatedKVProjection:
        LazyInitContext.materialize(module)
        tp, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        return ReplicatedKVProjection(module.weight, rank * kv_heads // tp, head_dim, process_group)

    def forward(self, x):
        x = reduce_backward(x, self.process_group)
        weight = reduce_backward(self.weight, self.process_group)
        return F.linear(x, weight[self.rows])  # (B, T, head_dim)


class SequenceSplitEmbedding(VocabParallelEmbedding1D):
    """The vocabulary-parallel embedding, its output split along the sequence (sequence parallelism)."""

    def forward(self, input_ids):
        return split_forward_gather_backward(super().forward(input_ids), 1, self.process_group)

    @staticmethod
    def from_native_module(module: nn.Embedding, process_group, **kwargs) -> SequenceSplitEmbedding:
        LazyInitContext.materialize(module)
        return SequenceSplitEmbedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                                      device=module.weight.device, process_group=process_group,
                                      weight=module.weight, **kwargs)


class SequenceGatherNorm(RMSNorm):
    """The final RMSNorm, its output gathered along the sequence for the head and loss (sequence parallelism)."""

    def forward(self, x):
        return gather_forward_split_backward(super().forward(x), 1, self.process_group)

    def add_and_norm(self, x, residual):
        normed, total = super().add_and_norm(x, residual)
        return gather_forward_split_backward(normed, 1, self.process_group), total

    @staticmethod
    def from_native_module(module: RMSNorm, process_group) -> SequenceGatherNorm:
        LazyInitContext.materialize(module)
        norm = SequenceGatherNorm(module.weight.shape[0], module.eps, module.kernels)
        norm.weight = module.weight
        norm.process_group = process_group
        _mark_partial_gradient(norm)
        return norm


def _mark_partial_gradient(norm: nn.Module) -> None:
    # each rank sees a slice of the sequence, so its norm weight gradient is partial; the plugin sums marked ones
    LazyInitContext.materialize(norm)
    SeqParallelUtils.marked_as_sp_partial_derived_param(norm.weight)


def seed_lazy_init(model: LlamaForCausalLM, seed: int) -> None:
    """Make a lazily built model's random weights independent of the parallel layout.

    Under LazyInitContext the initialisation runs when a parameter is materialized, from the global random stream:
    which values a layer gets then depends on which layers this rank materializes, and in what order (it differs
    between tp=1 and tp=2, and between pipeline stages). Re-recording each weight's initialisation with its own
    generator, seeded by the run's seed and the parameter's name, gives every layout the same weights. The
    distribution is the model's own (`LlamaForCausalLM._init_weights`). Eagerly built models are left alone.
    """
    from colossalai.accelerator import get_accelerator

    # The generator must live where the weights materialize: LazyInitContext re-runs the initialisation on the
    # accelerator's current device (training/plugins.py model_init_context), whatever device the lazy tensor reports.
    device = get_accelerator().get_current_device()
    std = model.config.initializer_range
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and isinstance(module.weight, LazyTensor):
            generator = torch.Generator(device=device)
            generator.manual_seed((seed * 1_000_003 + zlib.crc32(f"{name}.weight".encode())) % 2**63)
            with torch.no_grad():
                nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)


class LlamaPolicy(Policy):
    """Shardformer policy for model.llama.LlamaForCausalLM. See the module docstring.

    layers_per_stage: decoder layers of each pipeline stage, num_stages x num_model_chunks entries (chunk c of stage
    s at c * num_stages + s); None splits evenly (colossalai's rule: the remainder goes to the middle stages).
    """

    def __init__(self, layers_per_stage: list[int] | None = None):
        super().__init__()
        self.layers_per_stage = list(layers_per_stage) if layers_per_stage is not None else None

    # ---- checks --------------------------------------------------------------------------------
    def config_sanity_check(self):
        config, shard = self.model.config, self.shard_config
        if not isinstance(self.model, LlamaForCausalLM):
            raise ShardingError(f"LlamaPolicy shards model.llama.LlamaForCausalLM, not {type(self.model).__name__}")
        tp = shard.tensor_parallel_size
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        if heads % tp:
            raise ShardingError(f"tensor parallel size {tp} does not divide the {heads} attention heads")
        if kv_heads % tp and tp % kv_heads:
            raise ShardingError(
                f"tensor parallel size {tp} neither divides the {kv_heads} key-value heads nor is a multiple of them")
        if config.intermediate_size % tp:
            raise ShardingError(
                f"tensor parallel size {tp} does not divide intermediate_size {config.intermediate_size}")
        if shard.enable_sequence_parallelism:
            if shard.sequence_parallelism_mode not in SEQUENCE_PARALLEL_MODES:
                raise ShardingError(f"sequence parallelism mode {shard.sequence_parallelism_mode} is not supported "
                                    f"for the suite's Llama; use one of {', '.join(SEQUENCE_PARALLEL_MODES)}")
            if tp > kv_heads:
                raise ShardingError(f"sequence parallelism needs the key-value heads split, but tensor parallel "
                                    f"size {tp} exceeds the {kv_heads} key-value heads")
        manager = self.pipeline_stage_manager
        if manager is not None:
            if manager.use_zbv:
                raise ShardingError("the zero-bubble (zbv) pipeline schedule is not supported; use 1f1b or interleaved")
            layers, parts = config.num_hidden_layers, manager.num_stages * manager.num_model_chunks
            counts = self.layers_per_stage
            if counts is not None and (len(counts) != parts or sum(counts) != layers or min(counts) < 1):
                raise ShardingError(f"layers per stage {counts}: expected {parts} positive counts (stages x model "
                                    f"chunks) summing to the {layers} layers")
            if layers < parts:
                raise ShardingError(f"{layers} layers cannot fill {manager.num_stages} stages x "
                                    f"{manager.num_model_chunks} model chunks")

    # ---- the policy ----------------------------------------------------------------------------
    def preprocess(self) -> nn.Module:
        seed_lazy_init(self.model, torch.initial_seed())
        return self.model

    def postprocess(self) -> nn.Module:
        return self.model

    def module_policy(self) -> dict:
        policy = {}
        model_attributes = {}
        if self.shard_config.enable_tensor_parallelism and self.shard_config.tensor_parallel_size > 1:
            policy.update(self._tensor_parallel())
            model_attributes["kernels"] = self._vocab_parallel_kernels()
        if self.pipeline_stage_manager is not None:
            ranges = self._layer_ranges()
            model_attributes["pipeline_stage"] = PipelineStage(self.pipeline_stage_manager, ranges)
            # colossalai's interleaved schedule reads the chunks' ranges here and passes them to forward (stage_index)
            self.pipeline_stage_manager.stage_indices = ranges
        description = policy.setdefault(LlamaForCausalLM, ModulePolicyDescription())
        description.attribute_replacement = model_attributes
        return policy

    def _tensor_parallel(self) -> dict:
        config, shard = self.model.config, self.shard_config
        tp = shard.tensor_parallel_size
        sequence = shard.sequence_parallelism_mode if shard.enable_sequence_parallelism else None
        linear = dict(seq_parallel_mode=sequence, fp8_communication=shard.fp8_communication)
        kv_split = config.num_key_value_heads % tp == 0
        if kv_split:
            kv_target, kv_options = Linear1D_Col, linear
        else:
            kv_target, kv_options = ReplicatedKVProjection, dict(head_dim=config.head_dim,
                                                                 kv_heads=config.num_key_value_heads)

        def replace(suffix, target, options):
            return SubModuleReplacementDescription(suffix=suffix, target_module=target, kwargs=options)

        vocabulary = dict(make_vocab_size_divisible_by=shard.make_vocab_size_divisible_by,
                          fp8_communication=shard.fp8_communication)
        policy = {
            Attention: ModulePolicyDescription(
                attribute_replacement={"n_heads": config.num_attention_heads // tp,
                                       "n_kv_heads": config.num_key_value_heads // tp if kv_split else 1},
                sub_module_replacement=[replace("q_proj", Linear1D_Col, linear),
                                        replace("k_proj", kv_target, kv_options),
                                        replace("v_proj", kv_target, kv_options),
                                        replace("o_proj", Linear1D_Row, linear)]),
            MLP: ModulePolicyDescription(
                sub_module_replacement=[replace("gate_proj", Linear1D_Col, linear),
                                        replace("up_proj", Linear1D_Col, linear),
                                        replace("down_proj", Linear1D_Row, linear)]),
            LlamaModel: ModulePolicyDescription(sub_module_replacement=[
                replace("embed_tokens", SequenceSplitEmbedding if sequence else VocabParallelEmbedding1D, vocabulary),
            ]),
            # logits without labels (evaluation) come back whole; the training loss never gathers them
            LlamaForCausalLM: ModulePolicyDescription(sub_module_replacement=[
                replace("lm_head", VocabParallelLMHead1D, dict(gather_output=True, **vocabulary)),
            ]),
        }
        if sequence:
            policy[RMSNorm] = ModulePolicyDescription(param_replacement=[_mark_partial_gradient])
            policy[LlamaModel].sub_module_replacement.append(replace("norm", SequenceGatherNorm, {}))
        return policy

    def _vocab_parallel_kernels(self):
        kernels = self.model.kernels
        loss = partial(vocab_parallel_cross_entropy, process_group=self.shard_config.tensor_parallel_process_group,
                       vocab_size=self.model.config.vocab_size)
        names = tuple((op, "vocab_parallel" if op == "loss" else name) for op, name in kernels.names)
        return dataclasses.replace(kernels, loss=loss, names=names)

    # ---- pipeline ------------------------------------------------------------------------------
    def _layer_ranges(self) -> list[tuple[int, int]]:
        manager = self.pipeline_stage_manager
        counts = self.layers_per_stage or manager.distribute_layers(self.model.config.num_hidden_layers)
        return stage_layer_ranges(counts, manager.stage, manager.num_stages)

    def get_held_layers(self) -> list[nn.Module]:
        manager, model = self.pipeline_stage_manager, self.model
        held = []
        if manager.is_first_stage(ignore_chunk=True):
            held.append(model.model.embed_tokens)
        for start, end in self._layer_ranges():
            held.extend(model.model.layers[start:end])
        if manager.is_last_stage(ignore_chunk=True):
            held.extend([model.model.norm, model.lm_head])
        return held

    def get_shared_params(self) -> list[dict[int, torch.Tensor]]:
        """A tied embedding and head live on the first and the last stage; the plugin sums their gradients."""
        manager, model = self.pipeline_stage_manager, self.model
        if manager is None or manager.num_stages == 1 or model.lm_head.weight is not model.model.embed_tokens.weight:
            return []
        return [{0: model.model.embed_tokens.weight, manager.num_stages - 1: model.lm_head.weight}]
