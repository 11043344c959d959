"""Memory and strategy planner: what a plugin, micro batch and recomputation cost per GPU, and which to pick.

Pure arithmetic on a LlamaConfig; nothing here needs a GPU. The model follows what Colossal-AI 0.5.0 stores:

- LowLevelZero (zero1, zero2, zero2_cpu; zero/low_level/low_level_optim.py) keeps every bf16 working
  parameter on each GPU, an fp32 master shard (1/dp) and HybridAdam's fp32 m and v beside it (on the CPU with
  cpu_offload). Gradients leave `param.grad` through reduce buckets of 12 Mi elements (a parameter larger
  than that is flushed alone, plus its flattened copy); the reduced gradients stay in bf16, all of them for
  stage 1, the local shard for stage 2. At the step each shard's gradient is copied to fp32 (4 bytes/param/dp,
  on the GPU unless offloaded) and Adam runs on the master shard.
- Gemini (zero/gemini) packs parameters into chunks (min 32 Mi elements, searched to waste least; a larger
  parameter gets its own chunk), keeps a bf16 shard and an fp32 master shard of each chunk (1/dp), gathers a
  chunk while its layer computes, and writes the reduced gradient shard over the bf16 shard (reuse_fp16_chunk),
  so gradients cost nothing extra unless gradient accumulation needs separate gradient chunks. HybridAdam reads
  the bf16 gradient directly. offload_optim_frac puts that fraction of the fp32 chunks (and so of Adam's
  state) on the CPU; placement "auto" puts all of them there (gpu_margin_mem_ratio 0).
- HybridParallelPlugin (hybrid_parallel) divides parameters, gradients and optimizer state by tp*pp (the
  biggest pipeline stage counts) and ZeRO shards them again over dp; activations are divided by tp (sequence
  parallelism) and the first pipeline stage holds pp micro-batches in flight (1F1B).

Activations are the tensors autograd saves in the suite's model (model/llama.py), per token and layer, with the
plain kernels (fp32 copies inside RMSNorm, silu output kept) or fused ones (only bf16 inputs kept); attention
is flash-style (log-sum-exp, no T x T matrix) except for a bf16 (b, 1, T, T) mask per layer when SDPA runs
document masking. The plain loss holds fp32 logits three times at its backward peak; a fused cross-entropy on
materialised logits (liger_ce, flash_attn) bf16 logits and their gradient; a fused linear cross-entropy (liger)
about one (b, T, d) gradient and an fp32 head gradient.

Peak memory is the largest of three moments: the loss backward (all activations saved + the loss peak), the
backward of the layers (activations + gradient buckets + one layer's recomputation and gradients) and the
optimizer step (all gradients + fp32 copies). Every number that needs measuring is a named constant below.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

from model.config import LlamaConfig, recomputed_layers
from model.kernels.loss import fused_chunk_rows
from training.metrics import PEAK_BF16_FLOPS, TAGS
from training.plugins import GEMINI_PREFETCH_SEVERAL_GPUS, LOW_LEVEL_ZERO_PLUGINS, zero_stage

GIB = 2**30
BF16, FP32 = 2, 4

# ---- calibration: every assumption that a GPU measurement may correct --------------------------------------
MASTER_BYTES = 4  # fp32 master weight per parameter
ADAM_BYTES = 8  # HybridAdam m and v in fp32
ZERO_BUCKET_ELEMS = 12 * 2**20  # LowLevelZeroPlugin reduce_bucket_size_in_m=12 (elements, not bytes)
GEMINI_MIN_CHUNK_ELEMS = 32 * 2**20  # GeminiPlugin min_chunk_size_m=32
GEMINI_SEARCH_RANGE_ELEMS = 32 * 2**20  # GeminiPlugin search_range_m=32
GEMINI_SEARCH_INTERVAL = 1024  # hidden_dim=None -> search interval 1024
GEMINI_GATHERED_CHUNKS = 2  # chunks gathered at once while a layer computes, besides the prefetched ones
PLAIN_LOSS_FP32_COPIES = 3  # fp32 logits held at the plain loss backward: log_softmax out, its grad, input grad
FUSED_CE_BYTES_PER_VOCAB = 4  # fused CE on materialised logits (liger_ce, flash_attn): bf16 logits + bf16 grad
FUSED_LINEAR_BYTES_PER_TOKEN_D = 6  # fused linear CE (liger): bf16 input grad and its buffers, besides the logits
CUDA_CONTEXT_GIB = 0.6  # CUDA context, cuBLAS/cuDNN workspaces: outside max_memory_allocated
NCCL_GIB = 0.5  # NCCL buffers per GPU when there is more than one
FRAGMENTATION = 0.05  # caching-allocator reserve beyond the allocated peak
HOST_BASE_GIB_PER_RANK = 4.0  # Python, torch, CUDA host allocations and the data loader, per process
HEADROOM = 0.10  # keep this fraction of GPU (and host) memory free when recommending

# ---- expected throughput, relative to zero2 without recomputation at a saturating micro batch ---------------
ASSUMED_MFU = 0.40  # MFU of that best case; replace with a measured one (summarize_run) when there is one
PLUGIN_SPEED = {
    "zero1": 1.0,
    "zero2": 1.0,
    "gemini": 0.95,  # gathers and releases a parameter chunk around every layer
    "gemini_offload": 0.6,  # CPU Adam and PCIe traffic every step
    "gemini_auto": 0.6,
    "zero2_cpu": 0.6,
    "hybrid_parallel": 0.9,  # before the tp/pp factors below
}
OFFLOADED_SPEED_LOSS = 1 - PLUGIN_SPEED["gemini_offload"] / PLUGIN_SPEED["gemini"]  # per unit of offload_optim_frac
# zero2 on several GPUs reduce-scatters the gradients after every micro-batch (stage 2 cannot defer it); zero1 sums
# them in place and reduces once per step. Two H200s, 1b, 16 x 16: 76.8k against 79.7k tokens/s/GPU.
ZERO2_ACCUMULATION_SPEED = 0.96
RECOMPUTE_SPEED = 0.75  # one more forward: 8 instead of 6 passes over the weights
TP_SPEED_PER_DOUBLING = 0.95  # tensor-parallel all-gathers/reduce-scatters, within a node
PP_SPEED_PER_DOUBLING = 0.92  # pipeline bubble and point-to-point
SATURATING_TOKENS = 8192  # tokens per micro-batch beyond which the GPU is busy enough
SMALL_BATCH_LOSS_PER_HALVING = 0.05  # speed lost per halving below SATURATING_TOKENS
MAX_TOKENS_PER_MICRO_BATCH = 16384  # the "sensible cap": larger micro-batches buy nothing but memory
MAX_MICRO_BATCH = 64

# The planner's plugin names: the suite's -p values, plus gemini_offload (-p gemini --offload_optim_frac 1.0).
PLUGINS = ("zero1", "zero2", "zero2_cpu", "gemini", "gemini_offload", "gemini_auto", "hybrid_parallel")
RECOMMEND_ORDER = ("zero2", "zero1", "gemini", "gemini_auto", "zero2_cpu", "hybrid_parallel")  # ties go to the first
COST = {  # why a plugin is slower than zero2, for the recommendation's reason
    "zero1": "keeps full gradients on every GPU",
    "zero2": "keeps whole bf16 parameters on every GPU",
    "gemini": "gathers a parameter chunk around every layer",
    "gemini_offload": "runs Adam on the CPU every step",
    "gemini_auto": "runs Adam on the CPU every step",
    "zero2_cpu": "runs Adam on the CPU every step",
    "hybrid_parallel": "splits every layer over tensor/pipeline ranks (more communication, a pipeline bubble)",
}

# How each kernel backend (model/kernels) saves memory. Backends not named here keep what the plain one keeps.
LOSS_KINDS = {"torch": "plain", "triton": "fused_linear", "liger": "fused_linear", "liger_ce": "fused_ce",
              "flash_attn": "fused_ce"}
PLAIN_LAYER_BACKENDS = ("torch",)  # RMSNorm/SwiGLU backends that keep fp32 copies and the silu output
DENSE_MASK_ATTENTION = ("sdpa",)  # with packed documents: a dense (b, 1, T, T) mask per layer
# `--kernels auto` resolves on the GPU; without one the planner assumes it finds liger, triton and FlexAttention.
AUTO_ASSUMED = {"attention": "flex", "rms_norm": "liger", "rotary": "liger", "swiglu": "liger", "loss": "triton"}


def kernel_memory_flags(kernels: str | dict, attention_scope: str = "document") -> dict:
    """estimate()/recommend() keyword arguments for a --kernels preset name or resolved {op: backend} names
    (e.g. dict(Kernels.names) from the built model, which settles what `auto` chose)."""
    from model.kernels import PRESETS

    if isinstance(kernels, str):
        if kernels not in (*PRESETS, "auto"):
            raise ValueError(f"unknown kernel preset '{kernels}': expected one of {', '.join((*PRESETS, 'auto'))}")
        names = AUTO_ASSUMED if kernels == "auto" else PRESETS[kernels]
    else:
        names = dict(kernels)
    if names["attention"] == "math":
        raise ValueError("math attention (the 'reference' kernels) keeps T x T scores per layer: not planned; "
                         "it is for tests")
    return {"loss_kernel": LOSS_KINDS.get(names["loss"], "plain"),
            "fused_layers": not {names["rms_norm"], names["swiglu"]} & set(PLAIN_LAYER_BACKENDS),
            "document_mask": attention_scope == "document" and names["attention"] in DENSE_MASK_ATTENTION}


# ---- parameters ---------------------------------------------------------------------------------------------
def param_counts(config: LlamaConfig) -> dict[str, int]:
    """Parameters by component; the values add up to config.num_params()."""
    embedding = config.vocab_size * config.hidden_size
    return {
        "embedding": embedding,
        "layer": config.params_per_layer(),
        "layers": config.num_hidden_layers * config.params_per_layer(),
        "final_norm": config.hidden_size,
        "head": 0 if config.tie_word_embeddings else embedding,
        "total": config.num_params(),
    }


def _param_sizes(config: LlamaConfig) -> list[int]:
    """Each parameter's element count in model.parameters() order (the order Gemini packs chunks in)."""
    d, f, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    layer = [d, d * d, d * kv, d * kv, d * d, d, d * f, d * f, f * d]  # norm, q, k, v, o, norm, gate, up, down
    head = [] if config.tie_word_embeddings else [config.vocab_size * d]
    return [config.vocab_size * d] + layer * config.num_hidden_layers + [d] + head


def _unused(sizes: list[int], chunk: int) -> int:
    waste = left = 0
    for size in sizes:
        if size > left:
            waste, left = waste + left, chunk
        left -= size
    return waste + left


def gemini_chunks(config: LlamaConfig, dp: int) -> tuple[int, int, int]:
    """(chunk size, largest chunk, total chunk elements incl. waste), as Gemini's chunk search finds them.

    Gemini tries every chunk size in its range (every 1024 elements); here 64 coarse steps, then every 1024
    elements around the best of them: the same answer for 1b..70b, a hundred times faster.
    """
    return _chunk_layout(tuple(_param_sizes(config)), dp)


@functools.lru_cache(maxsize=256)
def _chunk_layout(sizes: tuple[int, ...], dp: int) -> tuple[int, int, int]:
    if sum(sizes) < GEMINI_MIN_CHUNK_ELEMS:
        return sum(sizes), sum(sizes), sum(sizes)
    mean = sum(sizes) / len(sizes)
    std = math.sqrt(sum((s - mean) ** 2 for s in sizes) / len(sizes))
    regular = [s for s in sizes if s <= mean + 3 * std]  # "extra-large" parameters get their own chunks
    start = math.ceil(max(GEMINI_MIN_CHUNK_ELEMS, max(regular)) / GEMINI_SEARCH_INTERVAL) * GEMINI_SEARCH_INTERVAL
    end = start + GEMINI_SEARCH_RANGE_ELEMS
    step = GEMINI_SEARCH_INTERVAL * max(1, GEMINI_SEARCH_RANGE_ELEMS // GEMINI_SEARCH_INTERVAL // 64)
    coarse = min(range(start, end + 1, step), key=lambda c: _unused(regular, c))
    fine = range(max(start, coarse - step), min(end, coarse + step) + 1, GEMINI_SEARCH_INTERVAL)
    chunk = min(fine, key=lambda c: _unused(regular, c))
    chunk += -chunk % dp
    total = largest = used = 0
    current = None  # capacity of the open chunk
    for size in sizes:
        if current is not None and used + size <= current:
            used += size
            continue
        current = max(chunk, size + (-size % dp))
        total, largest, used = total + current, max(largest, current), size
    return chunk, largest, total


# ---- activations, bytes per token ---------------------------------------------------------------------------
def layer_activation_bytes(config: LlamaConfig, *, fused_layers: bool, document_mask: bool, seq_len: int,
                           tp: int = 1, sequence_parallel: bool = False) -> float:
    """Bytes autograd keeps per token for one decoder layer without recomputation, on one of `tp` ranks.

    Tensor parallelism splits the heads and the MLP width, but without sequence parallelism every rank keeps the
    whole of the norms' inputs and outputs (the column-parallel projections' input), as Megatron's estimate has it.
    """
    d, f, h = config.hidden_size, config.intermediate_size, config.num_attention_heads
    kv = config.num_key_value_heads * config.head_dim
    norm = (2 * d if fused_layers else 6 * d) + 4  # bf16 input, or fp32 copy + normalised bf16; rstd
    norm_out = 2 * d  # saved by the projections after it
    attention = 2 * d + 2 * 2 * kv + 2 * d + 4 * h  # q, k after rotary; v; output (o_proj input); log-sum-exp
    mlp = (4 * f if fused_layers else 6 * f) + 2 * f  # gate, up (+ silu out); their product (down_proj input)
    mask = 2 * seq_len if document_mask else 0  # SDPA keeps its (b, 1, T, T) bf16 mask
    replicated = 2 * (norm + norm_out)
    return (attention + mlp + mask) / tp + replicated / (tp if sequence_parallel else 1)


def _outside_layers_bytes(config: LlamaConfig, *, fused_layers: bool, loss_kernel: str) -> int:
    """Per token: final norm (+ its output for a plain loss), rotary tables, input/label/position ids."""
    d = config.hidden_size
    final = (2 * d if fused_layers else 6 * d) + 4 + (0 if loss_kernel == "fused_linear" else 2 * d)
    return final + 2 * FP32 * config.head_dim + 3 * 8


def _backward_workspace_bytes(config: LlamaConfig) -> int:
    """Per token: gradients alive while one layer's MLP runs backward (grad of product, gate, up; two of d)."""
    return 6 * config.intermediate_size + 4 * config.hidden_size


def _loss_bytes(config: LlamaConfig, tokens: int, loss_kernel: str, tp: int) -> float:
    d, V = config.hidden_size, config.vocab_size
    if loss_kernel == "fused_linear":  # + one chunk of bf16 logits + the fp32 head-gradient accumulator
        return (tokens * FUSED_LINEAR_BYTES_PER_TOKEN_D * d + BF16 * fused_chunk_rows(tokens, d, V) * V
                + FP32 * V * d / tp)
    if loss_kernel == "fused_ce":
        return tokens * FUSED_CE_BYTES_PER_VOCAB * V / tp
    return tokens * PLAIN_LOSS_FP32_COPIES * FP32 * V / tp


def _eval_bytes(config: LlamaConfig, tokens: int, loss_kernel: str, tp: int) -> float:
    """Forward without autograd: one layer's largest moment (x, MLP input, gate/up/silu) and the loss."""
    d, f, V = config.hidden_size, config.intermediate_size, config.vocab_size
    loss = {"fused_linear": tokens * 4 * d, "fused_ce": tokens * BF16 * V / tp,
            "plain": tokens * 2 * FP32 * V / tp}[loss_kernel]  # plain: fp32 logits + log_softmax
    return tokens * (4 * d + 6 * f) / tp + loss


# ---- the estimate -------------------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    """Memory per GPU at the peak moment, in GiB. The components add up to allocated_gib.

    allocated_gib is what torch.cuda.max_memory_allocated() would report; total_gib adds the allocator's reserve
    and the CUDA context and is what must fit. host_gib is CPU memory per node (all its ranks).
    """

    plugin: str
    n_gpus: int
    micro_batch: int
    seq_len: int
    grad_checkpoint: int  # decoder layers recomputed (of each pipeline stage), 0 to layers_per_stage
    layers_per_stage: int
    tp: int
    pp: int
    zero: int
    dp: int
    offload_optim_frac: float
    grad_accum: int
    params: float
    grads: float
    optimizer: float
    activations: float
    loss: float
    buffers: float
    overhead: float
    allocated_gib: float
    total_gib: float
    host_gib: float
    eval_gib: float
    peak_phase: str

    COMPONENTS = ("params", "grads", "optimizer", "activations", "loss", "buffers", "overhead")

    def fits(self, gpu_mem_gib: float, host_mem_gib: float | None = None, headroom: float = HEADROOM) -> bool:
        gpu_ok = self.total_gib <= gpu_mem_gib * (1 - headroom)
        return gpu_ok and (host_mem_gib is None or self.host_gib <= host_mem_gib * (1 - headroom))

    def components(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.COMPONENTS}

    def to_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


def estimate(config: LlamaConfig, *, plugin: str, n_gpus: int, micro_batch: int, seq_len: int,
             grad_checkpoint: bool | int, fused_loss: bool = True, tp: int = 1, pp: int = 1, zero: int = 0,
             gpus_per_node: int = 8, fused_layers: bool | None = None, document_mask: bool = False,
             loss_kernel: str | None = None, offload_optim_frac: float = 0.0, grad_accum: int = 1,
             sequence_parallel: bool = False) -> MemoryEstimate:
    """Peak memory per GPU of one training configuration.

    grad_checkpoint: recomputation as -g gives it: True for every layer, a number for the first that many of each
    pipeline stage (model/config.py recomputed_layers).
    fused_loss: a fused linear cross-entropy that never holds the logits (else the plain fp32 loss).
    loss_kernel: "plain", "fused_linear" or "fused_ce" (bf16 logits kept); overrides fused_loss when given.
    fused_layers: fused RMSNorm/SwiGLU kernels that keep only bf16 inputs (None: same as fused_loss).
    document_mask: SDPA with an explicit document mask (--kernels torch with --attention_scope document).
    kernel_memory_flags() gives loss_kernel, fused_layers and document_mask for a --kernels preset.
    offload_optim_frac: -p gemini only. grad_accum > 1 keeps the previous micro-batches' gradients alive.
    sequence_parallel: hybrid_parallel with --sequence_parallel: activations along the sequence split over tp too.
    """
    _check_layout(config, plugin, n_gpus, tp, pp, zero, offload_optim_frac, gpus_per_node)
    if loss_kernel is None:
        loss_kernel = "fused_linear" if fused_loss else "plain"
    if loss_kernel not in ("plain", "fused_linear", "fused_ce"):
        raise ValueError(f"unknown loss_kernel '{loss_kernel}': expected plain, fused_linear or fused_ce")
    if plugin == "hybrid_parallel" and tp > 1:
        loss_kernel = "plain"  # model/policy.py's vocabulary-parallel loss: each rank's fp32 logits slice
    if fused_layers is None:
        fused_layers = fused_loss
    if plugin == "gemini_offload":
        offload_optim_frac = 1.0
    elif plugin == "gemini_auto":
        offload_optim_frac = 1.0  # auto placement: Adam on the CPU for every chunk (gpu_margin_mem_ratio 0)
    hybrid = plugin == "hybrid_parallel"
    dp = n_gpus // (tp * pp)
    N = config.num_params()
    tokens = micro_batch * seq_len

    # Parameter elements on this GPU (the largest pipeline stage), and the largest single tensor.
    counts = param_counts(config)
    layers_per_stage = math.ceil(config.num_hidden_layers / pp)
    if hybrid:
        first = counts["embedding"] + layers_per_stage * counts["layer"]
        last = counts["head"] + counts["final_norm"] + layers_per_stage * counts["layer"]
        P = (max(first, last) if pp > 1 else N) / tp
    else:
        P = N
    largest_param = max(_param_sizes(config)) / tp

    # Model states in bytes: GPU params, gradients held (during / at the end of backward), optimizer state on
    # the GPU, what the step adds, host bytes per rank, buffers (reduce buckets or gathered chunks).
    accum = grad_accum > 1
    if plugin in LOW_LEVEL_ZERO_PLUGINS or hybrid:
        shard = dp if (plugin != "hybrid_parallel" or zero >= 1) else 1
        partitioned = (hybrid and zero == 2) or (not hybrid and zero_stage(dp, plugin) == 2)
        on_cpu = plugin == "zero2_cpu"
        params = BF16 * P
        grads_end = BF16 * P / (shard if partitioned else 1)
        grads_held = grads_end if accum else 0.0
        optimizer = 0.0 if on_cpu else (MASTER_BYTES + ADAM_BYTES) * P / shard
        step = 0.0 if on_cpu else FP32 * P / shard  # fp32 copy of the gradient shard
        host = (MASTER_BYTES + ADAM_BYTES + FP32) * P / shard if on_cpu else 0.0
        buffers = 2 * BF16 * max(ZERO_BUCKET_ELEMS / tp, largest_param)  # param.grad + its flattened copy
        at_loss = gathered_for_compute = 0.0
    else:  # gemini, gemini_offload, gemini_auto
        _, largest_chunk, total_chunks = gemini_chunks(config, dp)
        frac = offload_optim_frac
        params = BF16 * total_chunks / dp
        optimizer = (1 - frac) * (MASTER_BYTES * total_chunks + ADAM_BYTES * N) / dp
        grads_end = 0.0  # written over the bf16 shard
        grads_held = (1 - frac) * BF16 * total_chunks / dp if accum else 0.0  # separate gradient chunks
        step = 0.0
        host = frac * (MASTER_BYTES * total_chunks + ADAM_BYTES * N + BF16 * total_chunks) / dp
        gathered = BF16 * largest_chunk * (1 - 1 / dp)  # beyond this rank's shard
        at_loss = gathered  # the head's chunk
        # On several GPUs Gemini also gathers the next chunks ahead (training/plugins.py gemini_prefetch's default).
        gathered_for_compute = (GEMINI_GATHERED_CHUNKS + GEMINI_PREFETCH_SEVERAL_GPUS) * gathered
        buffers = gathered_for_compute + BF16 * largest_param  # + a param.grad not yet copied into its chunk

    # Activations of the GPU that holds the most: 1F1B keeps pp micro-batches on the first stage.
    in_flight = pp if hybrid else 1
    layer = layer_activation_bytes(config, fused_layers=fused_layers, document_mask=document_mask, seq_len=seq_len,
                                   tp=tp, sequence_parallel=sequence_parallel)
    split = tp if sequence_parallel else 1  # what lies along the sequence: layer inputs, the final norm
    recomputed = recomputed_layers(grad_checkpoint, layers_per_stage)
    checkpointed = 2 * config.hidden_size / split  # a recomputed layer keeps its input only
    per_stage = recomputed * checkpointed + (layers_per_stage - recomputed) * layer
    saved = tokens * (in_flight * per_stage
                      + _outside_layers_bytes(config, fused_layers=fused_layers, loss_kernel=loss_kernel) / split)
    recompute = tokens * layer if recomputed else 0.0
    workspace = tokens * _backward_workspace_bytes(config) / tp
    loss = _loss_bytes(config, tokens, loss_kernel, tp)

    static = {"params": params, "optimizer": optimizer}
    phases = {
        "loss backward": {**static, "grads": grads_held, "activations": saved, "loss": loss, "buffers": at_loss},
        "layer backward": {**static, "grads": grads_held, "activations": saved + recompute + workspace,
                           "loss": 0.0, "buffers": buffers},
        "optimizer step": {**static, "grads": grads_end, "activations": 0.0, "loss": 0.0, "buffers": step},
    }
    peak_phase, peak = max(phases.items(), key=lambda item: sum(item[1].values()))
    allocated = sum(peak.values())
    overhead = FRAGMENTATION * allocated + (CUDA_CONTEXT_GIB + (NCCL_GIB if n_gpus > 1 else 0.0)) * GIB
    eval_bytes = params + _eval_bytes(config, tokens, loss_kernel, tp) + gathered_for_compute
    eval_total = eval_bytes * (1 + FRAGMENTATION) + CUDA_CONTEXT_GIB * GIB
    ranks_per_node = min(n_gpus, gpus_per_node)
    host_gib = ranks_per_node * (HOST_BASE_GIB_PER_RANK + host / GIB)

    return MemoryEstimate(
        plugin=plugin, n_gpus=n_gpus, micro_batch=micro_batch, seq_len=seq_len, grad_checkpoint=recomputed,
        layers_per_stage=layers_per_stage, tp=tp, pp=pp, zero=zero, dp=dp, offload_optim_frac=offload_optim_frac,
        grad_accum=grad_accum, **{k: v / GIB for k, v in peak.items()}, overhead=overhead / GIB,
        allocated_gib=allocated / GIB, total_gib=(allocated + overhead) / GIB, host_gib=host_gib,
        eval_gib=eval_total / GIB, peak_phase=peak_phase,
    )


def _check_layout(config, plugin, n_gpus, tp, pp, zero, offload_optim_frac, gpus_per_node) -> None:
    if plugin not in PLUGINS:
        raise ValueError(f"unknown plugin '{plugin}': the planner knows {', '.join(PLUGINS)}")
    if n_gpus < 1:
        raise ValueError(f"n_gpus must be at least 1, not {n_gpus}")
    if plugin != "hybrid_parallel" and (tp, pp, zero) != (1, 1, 0):
        raise ValueError(f"tp, pp and zero apply to hybrid_parallel only, not {plugin}")
    if plugin != "gemini" and offload_optim_frac:
        raise ValueError(f"offload_optim_frac applies to gemini (static placement) only, not {plugin}")
    if not 0.0 <= offload_optim_frac <= 1.0:
        raise ValueError(f"offload_optim_frac must be between 0 and 1, not {offload_optim_frac}")
    if n_gpus % (tp * pp):
        raise ValueError(f"{n_gpus} GPUs do not divide into tp {tp} x pp {pp}")
    if config.num_key_value_heads % tp:
        raise ValueError(f"tp {tp} does not divide the {config.num_key_value_heads} key-value heads")
    if tp > gpus_per_node:
        raise ValueError(f"tp {tp} spans more than one node of {gpus_per_node} GPUs")
    if pp > config.num_hidden_layers:
        raise ValueError(f"pp {pp} exceeds the {config.num_hidden_layers} layers")
    if zero not in (0, 1, 2) or (pp > 1 and zero == 2):
        raise ValueError(f"zero {zero} is not possible here: 0, 1 or 2, and at most 1 with pipeline parallelism")


# ---- the recommendation -------------------------------------------------------------------------------------
@dataclass
class Plan:
    """A configuration that fits, why it was chosen, and what it is expected to reach."""

    plugin: str  # the -p value
    micro_batch: int
    grad_checkpoint: int  # layers recomputed (of each pipeline stage), as MemoryEstimate.grad_checkpoint
    tp: int
    pp: int
    zero: int
    estimate: MemoryEstimate
    reason: str
    offload_optim_frac: float = 0.0
    speed: float = 1.0  # expected throughput relative to zero2 without recomputation at a saturating micro batch
    alternatives: list = field(default_factory=list, repr=False)  # other fitting candidates, best first

    @property
    def expected_mfu(self) -> float:
        return ASSUMED_MFU * self.speed

    def flags(self) -> list[str]:
        """The pretrain.py/benchmark.py flags that run this plan."""
        # With pipeline parallelism -b is the per-GPU batch that 1F1B splits into pp micro-batches of micro_batch.
        batch = self.micro_batch * (self.pp if self.pp > 1 else 1)
        out = ["-p", self.plugin, "-b", str(batch)]
        if self.grad_checkpoint == self.estimate.layers_per_stage:
            out.append("-g")
        elif self.grad_checkpoint:
            out += ["-g", str(self.grad_checkpoint)]
        if self.offload_optim_frac:
            out += ["--offload_optim_frac", f"{self.offload_optim_frac:g}"]
        if self.plugin == "hybrid_parallel":
            out += ["--tp", str(self.tp), "--pp", str(self.pp), "--zero", str(self.zero)]
            if self.pp > 1:
                out += ["--microbatch_size", str(self.micro_batch)]
        return out

    def describe(self) -> str:
        return _describe(self.estimate)

    def to_dict(self) -> dict:
        return {"plugin": self.plugin, "micro_batch": self.micro_batch, "grad_checkpoint": self.grad_checkpoint,
                "tp": self.tp, "pp": self.pp, "zero": self.zero, "offload_optim_frac": self.offload_optim_frac,
                "flags": self.flags(), "reason": self.reason, "expected_speed": round(self.speed, 3),
                "expected_mfu": round(self.expected_mfu, 3), "estimate": self.estimate.to_dict()}


class DoesNotFit(ValueError):
    """No plugin fits; min_gpus is the smallest GPU count (doubling) that does, or None."""

    def __init__(self, message: str, min_gpus: int | None):
        super().__init__(message)
        self.min_gpus = min_gpus


def speed(est: MemoryEstimate) -> float:
    """Expected throughput relative to zero2 without recomputation at a saturating micro batch."""
    value = PLUGIN_SPEED[est.plugin]
    if est.plugin == "gemini":
        value *= 1 - OFFLOADED_SPEED_LOSS * est.offload_optim_frac
    if est.plugin in LOW_LEVEL_ZERO_PLUGINS and zero_stage(est.dp, est.plugin) == 2 and est.grad_accum > 1:
        value *= ZERO2_ACCUMULATION_SPEED  # stage 2 cannot defer the reduction of a step's earlier micro-batches
    value *= 1 - (1 - RECOMPUTE_SPEED) * est.grad_checkpoint / est.layers_per_stage  # one more forward per layer
    value *= TP_SPEED_PER_DOUBLING ** math.log2(est.tp) * PP_SPEED_PER_DOUBLING ** math.log2(est.pp)
    tokens = est.micro_batch * est.seq_len
    if tokens < SATURATING_TOKENS:
        value *= 1 - SMALL_BATCH_LOSS_PER_HALVING * math.log2(SATURATING_TOKENS / tokens)
    return value


def _describe(est: MemoryEstimate) -> str:
    name = est.plugin
    if est.plugin == "gemini" and est.offload_optim_frac:
        name = f"gemini with {est.offload_optim_frac:.0%} of the optimizer on the CPU"
    if est.plugin == "hybrid_parallel":
        name = f"hybrid_parallel tp {est.tp} x pp {est.pp} (zero {est.zero})"
    if 0 < est.grad_checkpoint < est.layers_per_stage:
        return f"{name} recomputing {est.grad_checkpoint} of {est.layers_per_stage} layers"
    return f"{name} {'with' if est.grad_checkpoint else 'without'} recomputation"


def _layouts(config: LlamaConfig, plugin: str, n_gpus: int, gpus_per_node: int):
    """(tp, pp, zero, offload_optim_frac) choices worth trying for a plugin."""
    if plugin == "gemini":
        return [(1, 1, 0, frac) for frac in (0.0, 0.25, 0.5, 0.75)]  # all of it is what gemini_auto does
    if plugin != "hybrid_parallel":
        return [(1, 1, 0, 0.0)]
    out = []
    for tp in (1, 2, 4, 8, 16):
        for pp in (1, 2, 4, 8, 16, 32):
            if tp * pp == 1 or n_gpus % (tp * pp) or tp > gpus_per_node or pp > config.num_hidden_layers:
                continue
            if config.num_key_value_heads % tp:
                continue
            out.append((tp, pp, 1 if n_gpus > tp * pp else 0, 0.0))
    return out


def _micro_batches(seq_len: int, dp: int, global_batch_tokens: int | None) -> list[int]:
    """1, 2, 4, ... up to MAX_TOKENS_PER_MICRO_BATCH, dividing the global batch when there is one."""
    out, micro = [], 1
    while micro <= MAX_MICRO_BATCH and (micro == 1 or micro * seq_len <= MAX_TOKENS_PER_MICRO_BATCH):
        step_tokens = micro * seq_len * dp
        if global_batch_tokens is None or global_batch_tokens % step_tokens == 0:
            out.append(micro)
        micro *= 2
    return out


@dataclass
class _Candidate:
    est: MemoryEstimate
    speed: float
    fits: bool


def _candidates(config, *, n_gpus, gpu_mem_gib, seq_len, global_batch_tokens, gpus_per_node, host_mem_gib,
                plugins, micro_batch, grad_checkpoint, kernel_flags) -> list[_Candidate]:
    out = []
    for plugin in plugins:
        if plugin == "zero1" and zero_stage(n_gpus) == 1:
            continue  # zero2 runs stage 1 here too (training/plugins.py zero_stage): the same plan twice
        for tp, pp, zero, frac in _layouts(config, plugin, n_gpus, gpus_per_node):
            dp = n_gpus // (tp * pp)
            micros = [micro_batch] if micro_batch else _micro_batches(seq_len, dp, global_batch_tokens)
            for micro in micros:
                accum = 1 if global_batch_tokens is None else global_batch_tokens // (micro * seq_len * dp)

                def at(checkpoint: bool | int) -> _Candidate:
                    est = estimate(config, plugin=plugin, n_gpus=n_gpus, micro_batch=micro, seq_len=seq_len,
                                   grad_checkpoint=checkpoint, tp=tp, pp=pp, zero=zero, gpus_per_node=gpus_per_node,
                                   offload_optim_frac=frac, grad_accum=max(1, accum), **kernel_flags)
                    return _Candidate(est, speed(est), est.fits(gpu_mem_gib, host_mem_gib))

                if grad_checkpoint is not None:
                    out.append(at(grad_checkpoint))
                    continue
                none, every = at(False), at(True)
                out += [none, every]
                if every.fits and not none.fits:  # the fewest layers whose recomputation makes it fit
                    out.append(_fewest_recomputed(at, every))
    return out


def _fewest_recomputed(at, every: _Candidate) -> _Candidate:
    """The candidate recomputing the fewest layers that fits, given that none does not and `every` (all recomputed)
    does: memory falls with every layer recomputed, so a bisection finds it."""
    low, fitting = 0, every  # low layers do not fit, fitting.est.grad_checkpoint do
    while fitting.est.grad_checkpoint - low > 1:
        middle = at((low + fitting.est.grad_checkpoint) // 2)
        low, fitting = (low, middle) if middle.fits else (middle.est.grad_checkpoint, fitting)
    return fitting


def recommend(config: LlamaConfig, *, n_gpus: int, gpu_mem_gib: float, seq_len: int,
              global_batch_tokens: int | None = None, fused_loss: bool = True, gpus_per_node: int = 8,
              fused_layers: bool | None = None, document_mask: bool = False, loss_kernel: str | None = None,
              host_mem_gib: float | None = None,
              plugins: tuple[str, ...] = RECOMMEND_ORDER, micro_batch: int | None = None,
              grad_checkpoint: bool | int | None = None) -> Plan:
    """The fastest expected configuration that fits with HEADROOM to spare, or DoesNotFit.

    Expected speed (see `speed`): fewer layers recomputed over more (where none do not fit, the fewest that do),
    a micro batch up to MAX_TOKENS_PER_MICRO_BATCH, then zero2 > gemini > gemini_auto/zero2_cpu > hybrid_parallel
    (zero1 beats zero2 on several GPUs when steps accumulate micro-batches: ZERO2_ACCUMULATION_SPEED);
    ties go to the earlier plugin in `plugins`, then to the larger micro batch. micro_batch or grad_checkpoint (True
    for every layer, a number for that many) pin those choices;
    host_mem_gib (per node) also rules out offloading that the host cannot hold; with global_batch_tokens the
    micro batch x seq_len x data-parallel size must divide it (gradient accumulation is derived from it).
    """
    for plugin in plugins:
        if plugin not in PLUGINS:
            raise ValueError(f"unknown plugin '{plugin}': the planner knows {', '.join(PLUGINS)}")
    if global_batch_tokens is not None and (global_batch_tokens <= 0 or global_batch_tokens % seq_len):
        raise ValueError(f"global_batch_tokens {global_batch_tokens} is not a positive multiple of seq_len {seq_len}")
    search = dict(seq_len=seq_len, global_batch_tokens=global_batch_tokens, gpus_per_node=gpus_per_node,
                  host_mem_gib=host_mem_gib, plugins=plugins, micro_batch=micro_batch, grad_checkpoint=grad_checkpoint,
                  kernel_flags={"fused_loss": fused_loss, "fused_layers": fused_layers, "document_mask": document_mask,
                                "loss_kernel": loss_kernel})
    candidates = _candidates(config, n_gpus=n_gpus, gpu_mem_gib=gpu_mem_gib, **search)
    candidates.sort(key=lambda c: (-round(c.speed, 6), plugins.index(c.est.plugin), -c.est.micro_batch,
                                   c.est.tp * c.est.pp))
    if not candidates:
        raise ValueError(f"global_batch_tokens {global_batch_tokens} is smaller than one micro batch of {seq_len} "
                         f"tokens on every data-parallel rank of {n_gpus} GPUs")
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        raise _does_not_fit(config, n_gpus, gpu_mem_gib, candidates, search)
    best = fitting[0]
    est = best.est
    return Plan(plugin="gemini" if est.plugin == "gemini_offload" else est.plugin, micro_batch=est.micro_batch,
                grad_checkpoint=est.grad_checkpoint, tp=est.tp, pp=est.pp, zero=est.zero, estimate=est,
                reason=_reason(best, candidates, gpu_mem_gib, host_mem_gib),
                offload_optim_frac=est.offload_optim_frac if est.plugin in ("gemini", "gemini_offload") else 0.0,
                speed=best.speed, alternatives=[c.est for c in fitting[1:]])


def _variant(est: MemoryEstimate) -> tuple:
    return est.plugin, est.grad_checkpoint, est.tp, est.pp, est.offload_optim_frac


def _reason(best: _Candidate, candidates: list[_Candidate], gpu_mem_gib: float, host_mem_gib: float | None) -> str:
    """One sentence: what fits and in how much, the faster option that does not, the runner-up and its cost."""
    est = best.est
    usable = gpu_mem_gib * (1 - HEADROOM)
    text = (f"{_describe(est)} fits micro batch {est.micro_batch} ({est.micro_batch * est.seq_len:,} tokens) in "
            f"{est.total_gib:.1f} of {gpu_mem_gib:g} GiB ({usable:.0f} usable with {HEADROOM:.0%} headroom)")
    if est.plugin == "zero2_cpu" or est.offload_optim_frac:
        text += f" with {est.host_gib:.0f} GiB of host memory per node"
    # The fastest variant that would beat it but does not fit at any micro batch tried.
    blocked = [c for c in candidates if not c.fits and c.speed > best.speed
               and not any(f.fits and _variant(f.est) == _variant(c.est) for f in candidates)]
    if blocked:
        top = blocked[0]
        smallest = min((c.est for c in blocked if _variant(c.est) == _variant(top.est)),
                       key=lambda e: (round(e.total_gib, 1), e.micro_batch))
        need = f"{smallest.total_gib:.0f} GiB per GPU"
        if smallest.total_gib <= usable and host_mem_gib is not None:
            need = f"{smallest.host_gib:.0f} GiB of host memory per node"
        text += f"; {_describe(smallest)} would be faster but needs {need} even at micro batch {smallest.micro_batch}"
    runner = next((c for c in candidates if c.fits and c is not best and
                   (c.est.plugin, c.est.grad_checkpoint) != (est.plugin, est.grad_checkpoint)), None)
    if runner is not None:
        relative = runner.speed / best.speed
        text += f"; next best: {_describe(runner.est)} at micro batch {runner.est.micro_batch}"
        text += f", expected at {relative:.0%} of this speed" if relative < 0.995 else ", as fast by this model"
        text += f" ({_cost(runner.est, est)})"
    return text + "."


def _cost(other: MemoryEstimate, chosen: MemoryEstimate) -> str:
    if other.grad_checkpoint > chosen.grad_checkpoint:
        return "it recomputes more activations" if chosen.grad_checkpoint else "it recomputes activations"
    if (other.plugin, chosen.plugin) == ("zero2", "zero1"):
        return "it reduces the gradients after every micro-batch"
    if other.plugin != chosen.plugin:
        return f"it {COST[other.plugin]}"
    return "it uses a smaller micro batch" if other.micro_batch < chosen.micro_batch else "it comes later in the order"


def _does_not_fit(config, n_gpus, gpu_mem_gib, candidates, search) -> DoesNotFit:
    closest = min((c.est for c in candidates), key=lambda e: e.total_gib, default=None)
    need = ""
    if closest is not None:
        need = (f" (closest: {_describe(closest)} at micro batch {closest.micro_batch} needs "
                f"{closest.total_gib:.0f} GiB per GPU")
        need += f" and {closest.host_gib:.0f} GiB of host memory per node)" if search["host_mem_gib"] else ")"
    min_gpus = None
    gpus = n_gpus * 2
    while gpus <= 8192:
        if any(c.fits for c in _candidates(config, n_gpus=gpus, gpu_mem_gib=gpu_mem_gib, **search)):
            min_gpus = gpus
            break
        gpus *= 2
    more = f"; it needs at least {min_gpus} GPUs of {gpu_mem_gib:g} GiB" if min_gpus else ""
    return DoesNotFit(f"{config.name} does not fit on {n_gpus} GPU{'s' if n_gpus > 1 else ''} of {gpu_mem_gib:g} GiB "
                      f"with any plugin{need}{more}", min_gpus)


TABLE_PLUGINS = ("zero1", "zero2", "zero2_cpu", "gemini", "gemini_auto", "hybrid_parallel")


def memory_table(config: LlamaConfig, *, n_gpus: int, micro_batch: int, seq_len: int, gpu_mem_gib: float,
                 gpus_per_node: int = 8, tp: int | None = None, pp: int | None = None, zero: int | None = None,
                 **kernel_flags) -> list[MemoryEstimate]:
    """One estimate per plugin x recomputation, for the plan command's table.

    hybrid_parallel uses tp/pp/zero when given, else its fastest layout that fits (or the smallest if none does).
    """
    rows = []
    for plugin in TABLE_PLUGINS:
        for checkpoint in (False, True):
            common = dict(plugin=plugin, n_gpus=n_gpus, micro_batch=micro_batch, seq_len=seq_len,
                          grad_checkpoint=checkpoint, gpus_per_node=gpus_per_node, **kernel_flags)
            if plugin != "hybrid_parallel":
                rows.append(estimate(config, **common))
                continue
            if tp is not None or pp is not None:
                layout_tp, layout_pp = tp or 1, pp or 1
                layout_zero = zero if zero is not None else (1 if n_gpus > layout_tp * layout_pp else 0)
                rows.append(estimate(config, tp=layout_tp, pp=layout_pp, zero=layout_zero, **common))
                continue
            options = [estimate(config, tp=t, pp=p, zero=z, **common)
                       for t, p, z, _ in _layouts(config, plugin, n_gpus, gpus_per_node)]
            if options:
                fitting = [e for e in options if e.fits(gpu_mem_gib)]
                rows.append(max(fitting, key=speed) if fitting else min(options, key=lambda e: e.total_gib))
    return rows


# ---- time and throughput ------------------------------------------------------------------------------------
def training_days(config: LlamaConfig, tokens: float, n_gpus: int, seq_len: int, mfu: float,
                  peak_flops: float) -> float:
    """Days to train on `tokens` at a model-FLOPs utilisation `mfu` (tokens/s x flops_per_token / peak)."""
    tokens_per_s = n_gpus * peak_flops * mfu / config.flops_per_token(seq_len)
    return tokens / tokens_per_s / 86400


def peak_flops_for(gpu: str) -> float:
    """Dense bf16 peak FLOP/s of a GPU named like a key of PEAK_BF16_FLOPS (case-insensitive substring)."""
    for key, flops in PEAK_BF16_FLOPS.items():
        if key.lower() in gpu.lower():
            return flops
    raise ValueError(f"unknown GPU '{gpu}': the planner knows {', '.join(PEAK_BF16_FLOPS)}")


@dataclass
class RunSummary:
    logdir: str
    steps: int  # logged points used (after the warm-up ones)
    tokens_per_s_per_gpu: float | None
    tflops_per_gpu: float | None  # from tokens/s and config.flops_per_token(seq_len)
    mfu: float | None  # tflops_per_gpu / peak, or the logged MFU when the peak is unknown
    logged_mfu: float | None
    peak_mem_gib: float | None

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


RUN_WARMUP_FRACTION = 0.1  # drop the first logged points (compilation, allocator growth) before the median


def summarize_run(logdir: str, config: LlamaConfig | None = None, seq_len: int | None = None,
                  peak_flops: float | None = None) -> RunSummary:
    """Throughput of a finished run from its TensorBoard scalars (the TAGS that training.metrics writes).

    Medians over the logged points after the first RUN_WARMUP_FRACTION; TFLOPs need the config and sequence
    length (FLOPs per token), MFU also the GPU's peak.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    accumulator.Reload()
    available = set(accumulator.Tags().get("scalars", []))
    if TAGS["tokens_per_s_per_gpu"] not in available and TAGS["mfu"] not in available:
        found = ", ".join(sorted(available)) or "none"
        raise ValueError(f"{logdir}: no '{TAGS['tokens_per_s_per_gpu']}' or '{TAGS['mfu']}' scalars "
                         f"(scalars found: {found}); is this a run's TensorBoard folder?")

    def median(key: str) -> tuple[float | None, int]:
        if TAGS[key] not in available:
            return None, 0
        values = [event.value for event in accumulator.Scalars(TAGS[key])]
        values = values[int(len(values) * RUN_WARMUP_FRACTION):] or values
        ordered = sorted(values)
        middle = len(ordered) // 2
        return (ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2), len(values)

    tokens_per_s, steps = median("tokens_per_s_per_gpu")
    logged_mfu, mfu_steps = median("mfu")
    peak_mem = max((e.value for e in accumulator.Scalars(TAGS["peak_mem_gib"])), default=None) \
        if TAGS["peak_mem_gib"] in available else None
    tflops = mfu = None
    if tokens_per_s is not None and config is not None:
        tflops = tokens_per_s * config.flops_per_token(seq_len or config.max_position_embeddings) / 1e12
        if peak_flops:
            mfu = tflops * 1e12 / peak_flops
    if mfu is None:
        mfu = logged_mfu
    return RunSummary(logdir=str(logdir), steps=steps or mfu_steps, tokens_per_s_per_gpu=tokens_per_s,
                      tflops_per_gpu=tflops, mfu=mfu, logged_mfu=logged_mfu, peak_mem_gib=peak_mem)
