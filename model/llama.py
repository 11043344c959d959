"""A Llama for training: embedding -> blocks (attention, SwiGLU MLP) -> norm -> head.

Parameter names and shapes are those of transformers' `LlamaForCausalLM`, so Hugging Face checkpoints load
without renaming. No inference cache. No buffers either: rotary tables are computed per call, which keeps the
model buildable under Colossal-AI's LazyInitContext and gives Gemini no buffers to cast.

The fused ops come from a `Kernels` object resolved once (model/kernels); the model never picks them itself.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .config import LlamaConfig, recomputed_layers
from .kernels import Kernels, resolve_kernels
from .kernels.attention import document_ids
from .kernels.concat_linear import concat_linear, place_side_by_side
from .kernels.rotary import rotary_tables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernels: Kernels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels = kernels

    def forward(self, x):
        return self.kernels.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x, residual):
        """(norm(x + residual), x + residual), the add fused into the norm's kernel."""
        return self.kernels.add_rms_norm(x, residual, self.weight, self.eps)


def fusable(*linears: nn.Module) -> bool:
    """Whether one GEMM can serve these layers (kernels/concat_linear.py): plain bias-free nn.Linear layers can;
    others, such as colossalai's tensor-parallel layers put in by model/policy.py, run one by one."""
    return all(type(linear) is nn.Linear and linear.bias is None for linear in linears)


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x), through kernels/concat_linear.py for a plain bias-free nn.Linear: the same GEMMs, and a backward
    that can sum its weight gradient in place under gradient accumulation."""
    return concat_linear(x, layer.weight) if fusable(layer) else layer(x)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, kernels: Kernels):
        super().__init__()
        d, head_dim = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, head_dim
        self.q_proj = nn.Linear(d, self.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * head_dim, d, bias=False)
        self.kernels = kernels

    def forward(self, x, cos, sin, doc_ids):
        if fusable(self.q_proj, self.k_proj, self.v_proj):
            # one GEMM, then one kernel that turns its [q | k | v] output into rotated q, k and v
            # (kernels/qkv_rotary.py)
            qkv = concat_linear(x, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
            q, k, v = self.kernels.qkv_rotary(qkv, cos, sin, self.n_heads, self.n_kv_heads)
        else:  # tensor-parallel layers (model/policy.py) project this rank's heads, each in its own GEMM
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            batch, seq = q.shape[:2]  # not x's: under sequence parallelism x holds a slice of the sequence
            q = q.view(batch, seq, self.n_heads, self.head_dim)  # (B, T, H, D)
            k = k.view(batch, seq, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
            v = v.view(batch, seq, self.n_kv_heads, self.head_dim)
            q, k = self.kernels.rotary(q, k, cos, sin)
        out = self.kernels.attention(q, k, v, doc_ids)  # (B, T, H, D)
        return linear(self.o_proj, out.reshape(*out.shape[:2], self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig, kernels: Kernels):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.kernels = kernels

    def forward(self, x):
        if fusable(self.gate_proj, self.up_proj):
            # one GEMM whose output (..., 2F) is [gate | up], activated in that layout (kernels/swiglu_packed.py)
            gate_up = concat_linear(x, self.gate_proj.weight, self.up_proj.weight)
            return linear(self.down_proj, self.kernels.swiglu_packed(gate_up))
        return linear(self.down_proj, self.kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, kernels: Kernels):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.self_attn = Attention(config, kernels)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.mlp = MLP(config, kernels)

    def forward(self, x, cos, sin, doc_ids, residual=None):
        """The residual stream travels as two tensors whose sum it is, (x, residual), or x alone when residual is
        None. Returns (this layer's MLP output, the stream before it): the last add stays pending, for the next
        layer's input norm to do inside its kernel (RMSNorm.add_and_norm), as the add after attention is here."""
        if residual is None:
            residual, normed = x, self.input_layernorm(x)
        else:
            normed, residual = self.input_layernorm.add_and_norm(x, residual)
        attention_out = self.self_attn(normed, cos, sin, doc_ids)
        normed, residual = self.post_attention_layernorm.add_and_norm(attention_out, residual)
        return self.mlp(normed), residual


def run_layers(layers, x, cos, sin, doc_ids=None, recomputed: int = 0):
    """The decoder layers one after another: returns (x, residual), the stream being their sum, residual None when
    there are no layers (DecoderLayer.forward). The first `recomputed` layers keep only their inputs for the backward
    (which ones does not change the peak, all being held when the backward starts)."""
    residual = None
    for index, layer in enumerate(layers):
        if index < recomputed:
            x, residual = checkpoint(layer, x, cos, sin, doc_ids, residual, use_reentrant=False)
        else:
            x, residual = layer(x, cos, sin, doc_ids, residual)
    return x, residual


def compile_each(layers: nn.ModuleList) -> None:
    """torch.compile every layer in place, for fixed shapes (a training run's shapes do not change)."""
    for layer in layers:
        layer.compile(dynamic=False)


class LlamaModel(nn.Module):
    """The decoder stack; named `model` inside LlamaForCausalLM as in Hugging Face checkpoints."""

    def __init__(self, config: LlamaConfig, kernels: Kernels):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, kernels) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)


class LlamaForCausalLM(nn.Module):
    """forward(input_ids, labels=None, position_ids=None): logits (B, T, V) without labels, else the mean loss.

    Labels are already shifted: labels[b, t] is the target for position t, -100 to ignore (see corpus/).
    With `document_causal`, position_ids that restart at 0 mark packed documents: attention stays inside each
    document and rotary positions restart with it. Without it, rows are single causal sequences.
    `grad_checkpoint` recomputes activations in training's backward: True for every layer, a number for the first
    that many layers (of each pipeline stage), keeping only their inputs (config.py recomputed_layers).
    """

    def __init__(self, config: LlamaConfig, kernels: Kernels | None = None, *, document_causal: bool = True,
                 grad_checkpoint: bool | int = False, compile_blocks: bool = False):
        super().__init__()
        self.config = config
        self.kernels = kernels or resolve_kernels("torch")
        self.document_causal = document_causal
        self.grad_checkpoint = grad_checkpoint
        self.pipeline_stage = None  # set by model/policy.py when this process runs one stage of a pipeline
        self.layer_graphs = None  # set by use_cuda_graphs
        self.model = LlamaModel(config, self.kernels)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        if compile_blocks:
            self.compile_blocks()

    def compile_blocks(self) -> None:
        """torch.compile each decoder layer in place, fusing what the kernels leave apart (residual adds, casts, and
        with the torch kernels the norms, rotary and SwiGLU). In place, so parameter names, and with them
        checkpoints, stay those of Hugging Face; compilation itself happens at the first forward."""
        compile_each(self.model.layers)

    def use_cuda_graphs(self) -> None:
        """Replay the decoder layers' forward and backward as CUDA graphs where a forward allows it (cuda_graphs.py):
        captured at the first training forward, for plain causal rows without recomputation."""
        from .cuda_graphs import LayerGraphs

        self.layer_graphs = LayerGraphs(self.model.layers,
                                        lambda x, cos, sin: run_layers(self.model.layers, x, cos, sin))

    def fused_weight_groups(self) -> list[list[nn.Parameter]]:
        """The weights that one GEMM reads together (kernels/concat_linear.py): each layer's q/k/v, and its gate/up,
        where those layers are plain (model/policy.py's tensor-parallel layers run one by one)."""
        groups = []
        for layer in self.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for linears in ((attention.q_proj, attention.k_proj, attention.v_proj), (mlp.gate_proj, mlp.up_proj)):
                if fusable(*linears):
                    groups.append([linear.weight for linear in linears])
        return groups

    def place_fused_weights_side_by_side(self) -> int:
        """Each of fused_weight_groups moved into one buffer, in order (kernels/concat_linear.py
        place_side_by_side), so that its GEMM reads the weights in place instead of copying them together every
        forward and backward. Names, shapes and the parameters themselves stay as they are. Returns how many groups
        now lie side by side."""
        return sum(place_side_by_side(group) for group in self.fused_weight_groups())

    def _init_weights(self, module):
        # The initialisation of transformers' Llama: normal(0, initializer_range), norms at one.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def forward(self, input_ids, labels=None, position_ids=None, hidden_states=None, stage_index=None):
        # stage_index: colossalai's interleaved pipeline schedule passes the running chunk's layer range, which
        # pipeline_stage.layers() already gives
        hidden = self.hidden_states(input_ids, position_ids, hidden_states)
        if self.pipeline_stage is not None and not self.pipeline_stage.is_last():
            return {"hidden_states": hidden}  # what the pipeline schedule sends to the next stage
        if labels is None:
            return self.lm_head(hidden)
        return self.kernels.loss(hidden.flatten(0, 1), self.lm_head.weight, labels.flatten())

    def hidden_states(self, input_ids, position_ids=None, inputs=None):
        """Final normalised hidden states (B, T, d).

        Under pipeline parallelism, this stage's part of the way: a stage after the first starts from the previous
        stage's output `inputs`, runs only its own layers, and only the last stage applies the final norm.
        """
        stage = self.pipeline_stage
        batch, seq = input_ids.shape
        doc_ids = None
        if position_ids is not None and self.document_causal:
            doc_ids = document_ids(position_ids)
        else:
            position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        cos, sin = rotary_tables(position_ids, self.config.head_dim, self.config.rope_theta)
        x = self.model.embed_tokens(input_ids) if stage is None or stage.is_first() else inputs  # (B, T, d)
        layers = self.model.layers if stage is None else self.model.layers[stage.layers()]
        recomputed = recomputed_layers(self.grad_checkpoint, len(layers)) if self.training else 0
        graphs = self.layer_graphs
        if graphs is not None and stage is None and doc_ids is None and not recomputed and graphs.applies(x):
            x, residual = graphs(x, cos, sin)  # run_layers over every layer, replayed (cuda_graphs.py)
        else:
            x, residual = run_layers(layers, x, cos, sin, doc_ids, recomputed)
        if stage is not None and not stage.is_last():
            return x if residual is None else x + residual  # one tensor to the next stage
        return self.model.norm(x) if residual is None else self.model.norm.add_and_norm(x, residual)[0]
