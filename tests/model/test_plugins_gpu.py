"""Every kernel preset under every booster plugin, on one GPU: the first 10 losses of a small Llama match the run
with the reference kernels within bf16 tolerance.

Each run builds the model as training does, from the same seeds: under LazyInitContext for Gemini and
hybrid_parallel (training/plugins.py model_init_context, so the plugin materializes it), and for the other plugins
cast with its fused weights placed side by side (place_weights_for_plugin). It boosts it with HybridAdam and trains
10 steps on fixed random tokens: even steps on packed documents (document-causal attention, labels -100 across
boundaries), odd steps on plain causal rows. Runs are compared within one plugin, since lazy and eager construction
draw different initial weights.

hybrid_parallel runs with tp = pp = 1 and ZeRO stage 0: the shardformer path (model/policy.py's LlamaPolicy, which
seeds the lazy weights per parameter from the seed set before boosting) and the plugin's bf16 optimizer. With tp = 1
the policy shards nothing and keeps every kernel of the preset, the loss included (it replaces the loss kernel only
under tp > 1).
"""
from __future__ import annotations

import dataclasses
import socket
from contextlib import ExitStack, contextmanager, nullcontext
from unittest import mock

import pytest
import torch
from gemini_chunks import counted_item_calls

from model.config import CONFIGS
from model.kernels import PRESETS, missing_packages, resolve_kernels
from model.kernels.in_place_grads import weight_grads_summed_in_place
from model.llama import LlamaForCausalLM
from training.plugins import defers_grad_sync, model_init_context, place_weights_for_plugin, zero_stage

pytestmark = pytest.mark.gpu

CONFIG = dataclasses.replace(CONFIGS["tiny"], vocab_size=1024, hidden_size=256, intermediate_size=704,
                             num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4)
BATCH, SEQ, STEPS, LR = 4, 256, 10, 1e-3
PLUGINS = ["gemini", "gemini_whole", "gemini_auto", "zero2", "zero2_cpu", "ddp", "hybrid_parallel"]
CANDIDATES = ["torch", "liger", "flash_attn", "auto"]
RTOL = torch.finfo(torch.bfloat16).eps  # 2**-7: one bf16 rounding step, relative


@pytest.fixture(scope="module")
def distributed():
    import colossalai
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        colossalai.launch(rank=0, world_size=1, host="127.0.0.1", port=port, local_rank=0, verbose=False)
    yield


def make_plugin(name: str, bucket_m: float | None = None):
    """The plugin `name` as these tests run it; `bucket_m`: LowLevelZero's reduce_bucket_size_in_m, if not its own."""
    from colossalai.booster.plugin import GeminiPlugin, HybridParallelPlugin, LowLevelZeroPlugin, TorchDDPPlugin

    from model.policy import LlamaPolicy

    if name == "gemini":
        return GeminiPlugin(placement_policy="static", precision="bf16")
    if name == "gemini_whole":  # parameters never sharded, as -p gemini runs on one GPU (plugins.shard_param_frac)
        return GeminiPlugin(placement_policy="static", precision="bf16", shard_param_frac=0.0)
    if name == "gemini_auto":
        return GeminiPlugin(placement_policy="auto", precision="bf16")
    if name in ("zero2", "zero2_cpu"):
        bucket = {} if bucket_m is None else {"reduce_bucket_size_in_m": bucket_m}
        return LowLevelZeroPlugin(stage=2, precision="bf16", cpu_offload=name == "zero2_cpu", **bucket)
    if name == "ddp":
        return TorchDDPPlugin()  # float32 weights; the step runs under bf16 autocast, as training does
    if name == "hybrid_parallel":
        return HybridParallelPlugin(tp_size=1, pp_size=1, zero_stage=0, precision="bf16",
                                    custom_policy=LlamaPolicy())
    raise ValueError(name)


def precision(plugin_name: str) -> str:
    """make_plugin's precision: bf16, but plain DDP trains float32 weights under autocast."""
    return "fp32" if plugin_name == "ddp" else "bf16"


def batches() -> list[dict]:
    """Two fixed batches: packed documents with position restarts, and plain rows."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ + 1), generator=generator)
    positions = torch.zeros(BATCH, SEQ, dtype=torch.long)
    labels = ids[:, 1:].clone()
    for row in range(BATCH):
        cuts = sorted(torch.randperm(SEQ - 2, generator=generator)[:3].add(1).tolist())
        bounds = [0, *cuts, SEQ]
        positions[row] = torch.cat([torch.arange(b - a) for a, b in zip(bounds[:-1], bounds[1:])])
        labels[row, [c - 1 for c in cuts]] = -100  # no target across a document boundary
    packed = {"input_ids": ids[:, :-1], "labels": labels, "position_ids": positions}
    plain = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    return [packed, plain]


_LOSSES: dict[tuple[str, str], list[float]] = {}


def train_steps(model, optimizer, booster, plugin_name: str, steps: int) -> list[float]:
    """`steps` optimizer steps of the boosted model on batches(), alternating packed and plain rows; their losses."""
    device = torch.device("cuda", torch.cuda.current_device())
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if plugin_name == "ddp" else nullcontext()
    data = [{k: v.to(device) for k, v in batch.items()} for batch in batches()]
    losses = []
    model.train()
    for step in range(steps):
        with autocast:
            loss = model(**data[step % 2])
        booster.backward(loss, optimizer)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def first_losses(plugin_name: str, preset: str) -> list[float]:
    if (plugin_name, preset) in _LOSSES:
        return _LOSSES[plugin_name, preset]
    from colossalai.booster import Booster
    from colossalai.nn.optimizer import HybridAdam

    torch.manual_seed(0)
    with model_init_context(plugin_name):
        model = LlamaForCausalLM(CONFIG, resolve_kernels(preset))
    place_weights_for_plugin(model, plugin_name, precision(plugin_name))  # as the loop does; none for lazy builds
    optimizer = HybridAdam(model.parameters(), lr=LR)
    booster = Booster(plugin=make_plugin(plugin_name))
    # The lazy weights materialize while boosting: Gemini's from the global stream, hybrid_parallel's from per-parameter
    # generators seeded by torch.initial_seed() (model/policy.py seed_lazy_init), as pretrain.py's --seed does.
    torch.manual_seed(1)
    model, optimizer, *_ = booster.boost(model, optimizer)
    losses = train_steps(model, optimizer, booster, plugin_name, STEPS)
    print(f"{plugin_name:>12} {preset:>10}: " + " ".join(f"{x:.4f}" for x in losses), flush=True)
    _LOSSES[plugin_name, preset] = losses
    del model, optimizer, booster
    torch.cuda.empty_cache()
    return losses


@pytest.mark.parametrize("preset", CANDIDATES)
@pytest.mark.parametrize("plugin_name", PLUGINS)
def test_first_losses_match_reference_kernels(distributed, plugin_name, preset):
    names = PRESETS[preset] if preset != "auto" else dict(resolve_kernels("auto").names)
    missing = sorted({p for op, name in names.items() for p in missing_packages(op, name)})
    if missing:
        pytest.skip(f"preset '{preset}' needs {', '.join(missing)}, not installed")
    expected = first_losses(plugin_name, "reference")
    actual = first_losses(plugin_name, preset)
    assert all(torch.isfinite(torch.tensor(actual)))
    assert expected[-2] < expected[0], f"the reference run did not learn: {expected}"  # both packed batches
    mismatched = [f"step {i}: {a:.4f} vs {e:.4f}" for i, (a, e) in enumerate(zip(actual, expected))
                  if abs(a - e) > RTOL * abs(e)]
    assert not mismatched, f"{plugin_name} {preset} vs reference: " + "; ".join(mismatched)


def test_whole_parameters_on_one_gpu_train_like_sharded_ones(distributed):
    """-p gemini on one GPU keeps its parameter chunks whole (training/plugins.py shard_param_frac): from the same
    lazy weights and batches, the losses of colossalai's default, sharded chunks."""
    whole = first_losses("gemini_whole", "reference")
    sharded = first_losses("gemini", "reference")
    assert whole == pytest.approx(sharded, rel=RTOL), f"{whole} vs {sharded}"


def accumulated_steps(stage: int, defer: bool, in_place: bool = False, *, kernels: str = "torch",
                      place: bool = False, **plugin_options) -> tuple[list[torch.Tensor], list[float]]:
    """The weights after two optimizer steps of four micro-batches each, through LowLevelZero at `stage`, and the
    two gradient norms; with `defer`, every micro-batch but a step's last runs under booster.no_sync, as the training
    loop does (training/loop.py, plugins.defers_grad_sync), and with `in_place` those micro-batches' linear layers
    also sum their weight gradients inside their GEMMs, as the loop has them do (model/kernels/concat_linear.py).
    `place` lays the fused weights side by side first, as the loop does; `plugin_options` go to LowLevelZeroPlugin."""
    from colossalai.booster import Booster
    from colossalai.booster.plugin import LowLevelZeroPlugin
    from colossalai.nn.optimizer import HybridAdam

    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG, resolve_kernels(kernels))
    if place:
        place_weights_for_plugin(model, "zero2", "bf16")
    else:
        model = model.to(device)
    booster = Booster(plugin=LowLevelZeroPlugin(stage=stage, precision="bf16", **plugin_options))
    assert defers_grad_sync("zero2", booster.plugin) == (stage == 1)  # what the loop decides from the plugin
    model, optimizer, *_ = booster.boost(model, HybridAdam(model.parameters(), lr=LR))
    micro_batches = [{k: v[i:i + 1].to(device) for k, v in batch.items()} for batch in batches() for i in range(2)]
    norms = []
    for _ in range(2):
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with booster.no_sync(model, optimizer) if defer and not last else nullcontext():
                with weight_grads_summed_in_place(in_place and defer and not last):
                    booster.backward(model(**batch) / len(micro_batches), optimizer)
        optimizer.step()
        norms.append(optimizer._current_grad_norm)
        optimizer.zero_grad()
    weights = [p.detach().float().clone() for p in model.unwrap().parameters()]
    del model, optimizer, booster
    torch.cuda.empty_cache()
    return weights, norms


def accumulated_step_weights(stage: int, defer: bool, in_place: bool = False) -> list[torch.Tensor]:
    """accumulated_steps' weights, with the reference kernels and colossalai's default plugin options."""
    return accumulated_steps(stage, defer, in_place)[0]


def test_zero2_on_one_gpu_accumulates_in_place_with_the_same_result(distributed):
    """On one GPU, -p zero2 runs LowLevelZero at stage 1 and skips the reduction of all micro-batches but the last
    (training/plugins.py zero_stage); the weights after two accumulated steps match stage 2's, which reduces
    every micro-batch. The comparison is tight: both sum the same bf16 gradients in the same order."""
    assert zero_stage(1) == 1
    deferred = accumulated_step_weights(stage=zero_stage(1), defer=True)
    every_micro_batch = accumulated_step_weights(stage=2, defer=False)
    torch.manual_seed(0)
    initial = [p.float() for p in LlamaForCausalLM(CONFIG, resolve_kernels("torch")).parameters()]
    assert max((w.cpu() - p).abs().max().item() for w, p in zip(deferred, initial)) > 1e-4, "no step was taken"
    for got, expected in zip(deferred, every_micro_batch):
        assert torch.allclose(got, expected, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_weight_gradients_summed_in_place_give_the_same_steps(distributed, kernels):
    """-p zero2 on one GPU, as the loop runs it: the micro-batches under no_sync sum the linear layers' weight
    gradients inside their GEMMs (fp32 accumulation, one bf16 rounding) rather than through autograd (bf16 GEMM
    output, then a bf16 add), and with the auto kernels the Triton norms theirs inside their second kernel; the
    weights after two steps differ by at most a bf16 rounding step."""
    from model.kernels import concat_linear as kernel

    real, summed = kernel._sum_into_existing_grads, []
    with mock.patch.object(kernel, "_sum_into_existing_grads", lambda *args: summed.append(real(*args)) or summed[-1]):
        in_place = accumulated_steps(stage=zero_stage(1), defer=True, in_place=True, kernels=kernels)[0]
    # 2 steps x the 2 middle micro-batches of 4 (the first has no gradients yet, the last reduces) x 4 GEMMs a layer
    assert sum(summed) == 2 * 2 * 4 * CONFIG.num_hidden_layers
    through_autograd = accumulated_steps(stage=zero_stage(1), defer=True, kernels=kernels)[0]
    for got, expected in zip(in_place, through_autograd):
        assert torch.allclose(got, expected, rtol=RTOL, atol=1e-6)


# LowLevelZero's bucket, in millions of elements, under which the tiny model's weights pass their updates through a
# separate buffer, as 1b's do under the default 12: 7b's 45M-element MLP weights take the other path, a direct write
SMALL_BUCKET_M = 0.01


def weights_after_steps(plugin_name: str, place: str | None,
                        bucket_m: float | None = None) -> tuple[list[torch.Tensor], bool]:
    """The weights after three steps of `plugin_name` from the same initial weights, with the q/k/v and gate/up
    weights placed side by side (training/plugins.py place_weights_for_plugin) `before` boosting, as the loop does,
    `after` it, or not at all; and whether they still lie side by side at the end. `bucket_m`: LowLevelZero's
    reduce_bucket_size_in_m."""
    from colossalai.booster import Booster
    from colossalai.nn.optimizer import HybridAdam

    from model.kernels.concat_linear import side_by_side

    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG, resolve_kernels("auto"))
    if place == "before":
        place_weights_for_plugin(model, plugin_name, precision(plugin_name))
    else:
        model = model.to(device)
    booster = Booster(plugin=make_plugin(plugin_name, bucket_m))
    model, optimizer, *_ = booster.boost(model, HybridAdam(model.parameters(), lr=LR))
    inner = model.unwrap()
    if place == "after":
        inner.place_fused_weights_side_by_side()
    train_steps(model, optimizer, booster, plugin_name, 3)
    placed = all(side_by_side(group) is not None for group in inner.fused_weight_groups())
    weights = [p.detach().float().clone() for p in inner.parameters()]
    del model, optimizer, booster
    torch.cuda.empty_cache()
    return weights, placed


@pytest.mark.parametrize("plugin_name, bucket_m", [("zero2", None), ("zero2", SMALL_BUCKET_M),
                                                  ("zero2_cpu", SMALL_BUCKET_M), ("ddp", None)])
def test_weights_placed_side_by_side_train_exactly_like_scattered_ones(distributed, plugin_name, bucket_m):
    """The loop places each layer's q/k/v and gate/up weights side by side before boosting the eager plugins: they
    stay so through the steps (the GEMMs read them in place), and every weight after three steps is that of a run
    without the placement, bit for bit (the GEMMs see the same joined weight either way); for LowLevelZero along
    both of its ways of writing back the updated weights (SMALL_BUCKET_M)."""
    placed, still_placed = weights_after_steps(plugin_name, "before", bucket_m)
    scattered, _ = weights_after_steps(plugin_name, None, bucket_m)
    assert still_placed
    assert all(torch.equal(a, b) for a, b in zip(placed, scattered))


def test_weights_moved_after_lowlevelzero_is_built_are_never_updated(distributed):
    """Why the placement comes before boosting: LowLevelZero writes the new values of weights larger than its
    bucket (7b's MLP weights) into views of the storage they had when it was built, so weights moved after it keep
    their initial values."""
    torch.manual_seed(0)
    built = LlamaForCausalLM(CONFIG, resolve_kernels("auto"))
    initial = [p.to(torch.bfloat16).float().cuda() for p in built.parameters()]  # as LowLevelZero casts them
    moved_after, _ = weights_after_steps("zero2", "after", SMALL_BUCKET_M)
    before, _ = weights_after_steps("zero2", "before", SMALL_BUCKET_M)
    projections = [i for i, (name, _) in enumerate(built.named_parameters())
                   if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight",
                                     "up_proj.weight"))]
    assert len(projections) == 5 * CONFIG.num_hidden_layers
    assert all(torch.equal(moved_after[i], initial[i]) for i in projections)
    assert not any(torch.equal(before[i], initial[i]) for i in projections)


@contextmanager
def gemini_methods(ours: bool):
    """For the duration: training/gemini_fixes.py's replacements, or colossalai's own methods."""
    from training import gemini_fixes

    gemini_fixes.apply()  # once per process; ORIGINALS then holds colossalai's own
    with ExitStack() as stack:
        if not ours:
            for (cls, name), original in gemini_fixes.ORIGINALS.items():
                stack.enter_context(mock.patch.object(cls, name, original))
        yield


def gemini_accumulated_steps(ours: bool) -> tuple[dict, list[float], int]:
    """Two optimizer steps of four micro-batches through Gemini with gradient accumulation and clipping, as -p gemini
    trains: the weights after them, the two gradient norms, and how many .item() calls the backwards made."""
    from colossalai.booster import Booster
    from colossalai.booster.plugin import GeminiPlugin
    from colossalai.nn.optimizer import HybridAdam

    device = torch.device("cuda", torch.cuda.current_device())
    synchronised, norms = [], []
    with gemini_methods(ours):
        torch.manual_seed(0)
        with model_init_context("gemini"):
            model = LlamaForCausalLM(CONFIG, resolve_kernels("torch"))
        plugin = GeminiPlugin(placement_policy="static", precision="bf16", max_norm=0.05,
                              enable_gradient_accumulation=True)
        booster = Booster(plugin=plugin)
        torch.manual_seed(1)
        model, optimizer, *_ = booster.boost(model, HybridAdam(model.parameters(), lr=LR))
        micro_batches = [{k: v[i:i + 1].to(device) for k, v in batch.items()} for batch in batches() for i in range(2)]
        for _ in range(2):
            for batch in micro_batches:
                loss = model(**batch) / len(micro_batches)
                with counted_item_calls() as calls:
                    booster.backward(loss, optimizer)
                synchronised += calls
            optimizer.step()
            norms.append(optimizer._current_grad_norm)
            optimizer.zero_grad()
        weights = {name: value.float().cpu() for name, value in model.state_dict().items()}
    del model, optimizer, booster
    torch.cuda.empty_cache()
    return weights, norms, len(synchronised)


def assert_gemini_fixes_keep_the_accumulated_steps() -> None:
    theirs, their_norms, their_syncs = gemini_accumulated_steps(ours=False)
    ours, our_norms, our_syncs = gemini_accumulated_steps(ours=True)
    assert their_syncs > 0 and our_syncs == 0, (their_syncs, our_syncs)
    assert min(their_norms) > 0.05, f"clipping never engaged: {their_norms}"
    assert our_norms == pytest.approx(their_norms, rel=1e-6)  # float32 norms, summed in another order
    assert theirs.keys() == ours.keys()
    for name in theirs:
        assert torch.allclose(ours[name], theirs[name], rtol=RTOL, atol=1e-6), name


def test_gemini_fixes_keep_the_accumulated_steps(distributed):
    """training/gemini_fixes.py: the same weights and gradient norms as colossalai's own Gemini methods, with
    clipping active, and no host synchronisation left in the backward (colossalai's makes one per chunk)."""
    assert_gemini_fixes_keep_the_accumulated_steps()


def _gemini_fixes_on_ranks(rank: int, world_size: int) -> None:
    assert_gemini_fixes_keep_the_accumulated_steps()  # rank 0 compares the weights: Gemini gathers them there


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gemini_fixes_keep_the_accumulated_steps_on_two_gpus():
    """The same on two ranks, where each chunk is sharded and the accumulated shard is scaled by the rank count."""
    from gloo_ranks import run_on_ranks

    run_on_ranks(_gemini_fixes_on_ranks, world_size=2, backend="nccl")


@contextmanager
def zero_one_rank_methods(ours: bool):
    """For the duration: training/zero_fixes.py's one-rank reduction and step, or colossalai's own (the gradient
    norm stays the suite's in both, so that the runs differ in those two methods only)."""
    from colossalai.zero.low_level.low_level_optim import LowLevelZeroOptimizer

    from training import zero_fixes

    zero_fixes.apply()
    with ExitStack() as stack:
        if not ours:
            for name in ("step", "_run_reduction"):
                stack.enter_context(mock.patch.object(LowLevelZeroOptimizer, name, zero_fixes.colossalais_own(name)))
        yield


def zero_accumulated_steps(ours: bool, stage: int, overlap: bool) -> tuple[list[torch.Tensor], list[float]]:
    """accumulated_steps as the loop runs them (fused weights placed, stage 1 deferring the reduction) with
    clipping and small buckets, through training/zero_fixes.py's one-rank methods or colossalai's own."""
    with zero_one_rank_methods(ours):
        return accumulated_steps(stage, defer=stage == 1, kernels="auto", place=True, max_norm=0.05,
                                 overlap_communication=overlap, reduce_bucket_size_in_m=SMALL_BUCKET_M)


@pytest.mark.parametrize("stage, overlap", [(1, False), (1, True), (2, True)],
                         ids=["as-the-suite-runs-it", "stage-1-overlapped", "stage-2"])
def test_zero_on_one_gpu_steps_bit_identically_without_communicating(distributed, stage, overlap):
    """training/zero_fixes.py on one GPU registers the gradients without the bucket's copies and casts and writes
    back all weights at once: the weights and norms are colossalai's own, bit for bit, with clipping active."""
    theirs, their_norms = zero_accumulated_steps(False, stage, overlap)
    ours, our_norms = zero_accumulated_steps(True, stage, overlap)
    assert min(their_norms) > 0.05, f"clipping never engaged: {their_norms}"
    assert our_norms == their_norms
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
