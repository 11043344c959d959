"""The suite's Llama on its own: configs, packing, kernel tables, clear errors."""
import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dispatched_ops import DispatchedOps

from model.config import CONFIGS, LlamaConfig
from model.kernels import resolve_kernels
from model.llama import LlamaForCausalLM

SMALL = dataclasses.replace(CONFIGS["tiny"], num_hidden_layers=2, vocab_size=300)


def test_registry_sizes():
    one_b = CONFIGS["1b"]
    assert (one_b.num_hidden_layers, one_b.hidden_size, one_b.num_attention_heads) == (22, 2048, 32)
    assert (one_b.num_key_value_heads, one_b.intermediate_size, one_b.vocab_size) == (4, 5632, 32000)
    assert one_b.max_position_embeddings == 2048 and one_b.rms_norm_eps == 1e-5
    assert abs(one_b.num_params() - 1.1e9) < 0.01e9
    assert CONFIGS["70b"].num_key_value_heads == 8
    assert abs(CONFIGS["7b"].num_params() - 6.74e9) < 0.01e9


def test_unknown_config_name_is_one_clear_line():
    with pytest.raises(ValueError, match="unknown model config 'huge'.*tiny"):
        LlamaConfig.from_name("huge")


def test_hf_config_round_trip(tmp_path):
    CONFIGS["70b"].save_hf(tmp_path)
    loaded = LlamaConfig.from_name(str(tmp_path))
    assert loaded == CONFIGS["70b"]


def test_packed_documents_match_separate_documents():
    """Document-causal attention: two documents packed in one row give the logits each gives alone."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(SMALL, resolve_kernels("reference")).eval()
    first, second = torch.randint(0, 300, (1, 7)), torch.randint(0, 300, (1, 9))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        together = model(packed, position_ids=positions)
        alone = torch.cat([model(first), model(second)], dim=1)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("document_causal", [True, False])
def test_sdpa_matches_math_reference(document_causal):
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 32))
    positions = torch.cat([torch.arange(10), torch.arange(22)]).expand(2, 32)
    reference = LlamaForCausalLM(SMALL, resolve_kernels("reference"), document_causal=document_causal)
    fast = LlamaForCausalLM(SMALL, resolve_kernels("torch"), document_causal=document_causal)
    fast.load_state_dict(reference.state_dict())
    torch.testing.assert_close(fast(ids, position_ids=positions), reference(ids, position_ids=positions),
                               atol=1e-5, rtol=1e-5)


def test_grad_checkpoint_gives_same_gradients():
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 16))
    labels = torch.randint(0, 300, (2, 16))
    plain = LlamaForCausalLM(SMALL)
    recomputed = LlamaForCausalLM(SMALL, grad_checkpoint=True)
    recomputed.load_state_dict(plain.state_dict())
    plain(ids, labels=labels).backward()
    recomputed(ids, labels=labels).backward()
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def saved_bytes_and_checkpointed(model, ids, monkeypatch) -> tuple[int, list[int]]:
    """The bytes autograd keeps for the backward of one training forward, and which layers (by position in the
    model) ran under activation checkpointing."""
    import model.llama as llama
    from torch.utils.checkpoint import checkpoint

    layers = list(model.model.layers)
    checkpointed, saved = [], []
    monkeypatch.setattr(llama, "checkpoint", lambda layer, *args, **kwargs: checkpointed.append(layers.index(layer))
                        or checkpoint(layer, *args, **kwargs))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        model(ids, labels=ids)
    return sum(saved), checkpointed


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_recomputing_the_first_layers_only_saves_memory_in_between_and_the_same_gradients(layers, monkeypatch):
    """-g LAYERS: the first LAYERS layers recompute their activations, the others keep them: less memory kept for
    the backward than none recomputed, more than all, and the gradients of a plain backward."""
    config = dataclasses.replace(SMALL, num_hidden_layers=4)
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 16))
    plain = LlamaForCausalLM(config)
    some, every = LlamaForCausalLM(config, grad_checkpoint=layers), LlamaForCausalLM(config, grad_checkpoint=True)
    for model in (some, every):
        model.load_state_dict(plain.state_dict())
    plain(ids, labels=ids).backward()
    some(ids, labels=ids).backward()
    for (name, a), b in zip(plain.named_parameters(), some.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    kept = {}
    for name, model in (("none", plain), ("some", some), ("all", every)):
        kept[name], checkpointed = saved_bytes_and_checkpointed(model, ids, monkeypatch)
        assert checkpointed == list(range({"none": 0, "some": layers, "all": 4}[name])), name
    assert kept["none"] > kept["some"] > kept["all"]
    layer_share = (kept["none"] - kept["all"]) / 4  # each recomputed layer keeps its input only
    assert kept["none"] - kept["some"] == pytest.approx(layers * layer_share, rel=0.01)  # shared tables aside
    some.eval()
    assert saved_bytes_and_checkpointed(some, ids, monkeypatch)[1] == []  # recomputation is for training only


def test_a_pipeline_stage_recomputes_the_first_layers_of_its_own(monkeypatch):
    from types import SimpleNamespace

    model = LlamaForCausalLM(dataclasses.replace(SMALL, num_hidden_layers=4), grad_checkpoint=1)
    model.pipeline_stage = SimpleNamespace(is_first=lambda: True, is_last=lambda: True, layers=lambda: slice(2, 4))
    assert saved_bytes_and_checkpointed(model, torch.randint(0, 300, (2, 8)), monkeypatch)[1] == [2]


def test_recomputed_layers_reads_the_flag_as_given():
    from model.config import recomputed_layers

    assert [recomputed_layers(g, 22) for g in (False, True, 0, 1, 8, 22, 40)] == [0, 22, 0, 1, 8, 22, 22]
    with pytest.raises(ValueError, match="0 or more, not -1"):
        recomputed_layers(-1, 22)


def test_compiled_blocks_keep_hugging_face_names():
    """--compile compiles each layer in place: no `_orig_mod` in the names, so checkpoints load either way.
    (The compiled step's losses against the eager ones: tests/training/test_compile_gpu.py.)"""
    plain = LlamaForCausalLM(SMALL)
    compiled = LlamaForCausalLM(SMALL, compile_blocks=True)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert all(layer._compiled_call_impl is not None for layer in compiled.model.layers)
    assert all(layer._compiled_call_impl is None for layer in plain.model.layers)


def test_unknown_kernel_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        resolve_kernels("torch", {"attention": "nope"})
    with pytest.raises(ValueError, match="unknown kernel preset"):
        resolve_kernels("fastest-please")


def test_builds_on_meta_device_without_buffers():
    """No buffers: the model must build under LazyInitContext, and Gemini must have nothing to cast."""
    with torch.device("meta"):
        model = LlamaForCausalLM(CONFIGS["7b"])
    assert list(model.buffers()) == []
    assert sum(p.numel() for p in model.parameters()) == CONFIGS["7b"].num_params()


# ---- fused projections and the residual stream carried as a pair ----------------------------------------------
def test_concat_linear_matches_separate_projections():
    from model.kernels.concat_linear import concat_linear

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(n, 8, dtype=torch.float64, requires_grad=True) for n in (6, 2, 2)]
    upstream = torch.randn(2, 5, 10, dtype=torch.float64)
    (concat_linear(x, *weights) * upstream).sum().backward()
    fused = [x.grad.clone()] + [w.grad.clone() for w in weights]
    for t in (x, *weights):
        t.grad = None
    separate = torch.cat([x @ w.t() for w in weights], dim=-1)
    assert torch.allclose(concat_linear(x, *weights), separate)
    (separate * upstream).sum().backward()
    for got, expected in zip(fused, [x.grad] + [w.grad for w in weights]):
        assert torch.allclose(got, expected)


def test_concat_linear_with_frozen_weights_gives_only_the_input_gradient():
    from model.kernels.concat_linear import concat_linear

    torch.manual_seed(0)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(n, 8, dtype=torch.float64) for n in (3, 5)]
    concat_linear(x, *weights).sum().backward()
    assert torch.allclose(x.grad, torch.cat(weights).sum(0).expand(4, 8))  # d sum(x @ W.T) / dx: W's column sums
    assert all(w.grad is None for w in weights)


def accumulated_grads(model, micro_batches, summed_in_place: bool) -> tuple[dict, Counter]:
    """The gradients of the micro-batches' losses, summed; with `summed_in_place`, every backward but the last runs
    under weight_grads_summed_in_place, as the loop's micro-batches under no_sync do. Also how many gradient tensors
    autograd was handed to add per parameter (gradient hooks also run, with None, for those summed in place)."""
    from model.kernels.in_place_grads import weight_grads_summed_in_place

    model.zero_grad(set_to_none=True)
    accumulations = Counter()

    def count(name: str):
        def hook(grad):
            if grad is not None:
                accumulations[name] += 1
        return hook

    handles = [p.register_hook(count(name)) for name, p in model.named_parameters()]
    for i, ids in enumerate(micro_batches):
        loss = model(ids, labels=ids)
        with weight_grads_summed_in_place(summed_in_place and i < len(micro_batches) - 1):
            loss.backward()
    for handle in handles:
        handle.remove()
    return {name: p.grad.clone() for name, p in model.named_parameters()}, accumulations


def test_weight_grads_summed_inside_the_gemms_equal_autograds_sums():
    torch.manual_seed(0)
    model = LlamaForCausalLM(SMALL, resolve_kernels("reference"))
    micro_batches = [torch.randint(0, 300, (2, 12)) for _ in range(3)]
    expected, autograd_sums = accumulated_grads(model, micro_batches, summed_in_place=False)
    got, in_place_sums = accumulated_grads(model, micro_batches, summed_in_place=True)
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-5, atol=1e-7), name
    projections = {name for name in expected if name.endswith("_proj.weight")}
    assert len(projections) == 7 * SMALL.num_hidden_layers
    assert all(autograd_sums[name] == 3 for name in expected)
    # the second micro-batch's projection gradients went into the first's inside the GEMMs, past AccumulateGrad;
    # the first (no gradients yet) and the last (hooks must see it) went through AccumulateGrad
    assert all(in_place_sums[name] == 2 for name in projections)
    assert all(in_place_sums[name] == 3 for name in set(expected) - projections)  # norms, embeddings, lm_head


@pytest.mark.parametrize("case", ["apart", "autocast"])
def test_in_place_sums_leave_gradients_to_autograd_where_they_cannot_go_in_place(case):
    """Gradients that do not lie side by side in one buffer (here one replaced by a copy), or of another dtype than
    the GEMM's (a float32 weight under bf16 autocast, plain DDP's way), are summed by autograd as usual."""
    from model.kernels.concat_linear import concat_linear, grads_side_by_side
    from model.kernels.in_place_grads import weight_grads_summed_in_place

    torch.manual_seed(0)
    x = torch.randn(4, 8)
    weights = [torch.nn.Parameter(torch.randn(n, 8)) for n in ((3, 2, 2) if case == "apart" else (3,))]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast")
    with autocast:
        out = concat_linear(x, *weights)
    out.float().sum().backward()
    assert grads_side_by_side(weights) is not None  # the split views of one GEMM's output
    if case == "apart":
        weights[1].grad = weights[1].grad.clone()
        assert grads_side_by_side(weights) is None
    expected = [2 * w.grad for w in weights]  # the same backward once more
    with autocast:
        out = concat_linear(x, *weights)
    with weight_grads_summed_in_place():
        out.float().sum().backward()
    for got, want in zip([w.grad for w in weights], expected):
        assert torch.allclose(got, want)


def test_concat_linear_under_autocast_is_f_linear_under_autocast():
    """Float32 weights under bf16 autocast (how plain DDP trains): bf16 output, float32 weight gradients, the values
    of F.linear under the same autocast."""
    from model.kernels.concat_linear import concat_linear

    torch.manual_seed(0)
    x = torch.randn(3, 16, requires_grad=True)
    weights = [torch.randn(n, 16, requires_grad=True) for n in (8, 4)]
    results = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = concat_linear(x, *weights) if fused else torch.cat([F.linear(x, w) for w in weights], dim=-1)
        out.float().square().sum().backward()
        results.append([out.detach()] + [t.grad for t in (x, *weights)])
        for t in (x, *weights):
            t.grad = None
    for got, expected in zip(*results):
        assert got.dtype == expected.dtype
        assert torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-2)


class CountingLinear(torch.nn.Linear):
    """A Linear that is not a plain nn.Linear, as colossalai's parallel layers are not."""


def test_weights_placed_side_by_side_are_joined_without_a_copy():
    """place_fused_weights_side_by_side: q/k/v and gate/up of every layer lie in one buffer each, the joined GEMMs
    read them there (no cat, forward or backward), and the loss, every gradient and the state dict are those of
    the model as built."""
    from model.kernels.concat_linear import _joined, side_by_side

    torch.manual_seed(0)
    scattered = LlamaForCausalLM(SMALL, resolve_kernels("reference"))
    placed = LlamaForCausalLM(SMALL, resolve_kernels("reference"))
    placed.load_state_dict(scattered.state_dict())
    parameters = list(placed.parameters())
    assert all(side_by_side(group) is None for group in placed.fused_weight_groups())
    assert placed.place_fused_weights_side_by_side() == 2 * SMALL.num_hidden_layers
    assert list(placed.parameters()) == parameters  # the same objects: an optimizer built before still holds them
    for group in placed.fused_weight_groups():
        assert _joined(group).data_ptr() == group[0].data_ptr()
    ids = torch.randint(0, 300, (2, 12))
    cats = {}
    for name, model in (("scattered", scattered), ("placed", placed)):
        with DispatchedOps() as ops:
            model(ids, labels=ids).backward()
        cats[name] = ops.calls.count(torch.ops.aten.cat.default)
    # one cat per group in the forward and one in the backward, only without the placement
    assert cats["scattered"] - cats["placed"] == 2 * len(placed.fused_weight_groups())
    for (name, a), b in zip(scattered.named_parameters(), placed.parameters()):
        assert torch.equal(a.grad, b.grad), name
    shapes = [{k: v.shape for k, v in model.state_dict().items()} for model in (placed, scattered)]
    assert shapes[0] == shapes[1]
    assert placed.place_fused_weights_side_by_side() == 2 * SMALL.num_hidden_layers  # a second call changes nothing
    assert all(_joined(group).data_ptr() == group[0].data_ptr() for group in placed.fused_weight_groups())


def test_weights_placed_side_by_side_save_and_load_as_separate_tensors(tmp_path):
    """safetensors writes each view of the shared buffer as its own tensor (it refuses only overlapping ones), and
    loading into a placed model copies into the buffer, keeping the placement."""
    from safetensors.torch import load_file, save_file

    from model.kernels.concat_linear import side_by_side

    torch.manual_seed(0)
    placed = LlamaForCausalLM(SMALL, resolve_kernels("reference"))
    placed.place_fused_weights_side_by_side()
    save_file(placed.state_dict(), tmp_path / "model.safetensors")
    loaded = load_file(tmp_path / "model.safetensors")
    for name, tensor in placed.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    other = LlamaForCausalLM(SMALL, resolve_kernels("reference"))
    other.place_fused_weights_side_by_side()
    other.load_state_dict(loaded)
    assert all(side_by_side(group) is not None for group in other.fused_weight_groups())
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), placed.parameters()))


def test_side_by_side_only_joins_tensors_contiguous_and_in_order():
    from model.kernels.concat_linear import place_side_by_side, side_by_side

    buffer = torch.arange(24.).reshape(6, 4)
    assert torch.equal(side_by_side([buffer[:2], buffer[2:3], buffer[3:]]), buffer)
    assert side_by_side([buffer[2:4], buffer[:2]]) is None  # out of order
    assert side_by_side([buffer[:2], buffer[3:]]) is None  # a gap
    assert side_by_side([buffer[:2], torch.zeros(2, 4)]) is None  # another storage
    assert side_by_side([buffer[:, :2], buffer[:, 2:]]) is None  # not contiguous
    assert side_by_side([buffer[:2], buffer[2:].view(torch.int32)]) is None  # another dtype
    memory = np.arange(24, dtype=np.float32)
    apart = [torch.from_numpy(memory[:8]).view(2, 4), torch.from_numpy(memory[8:]).view(4, 4)]
    assert apart[1].data_ptr() == apart[0].data_ptr() + 32  # adjacent addresses ...
    assert side_by_side(apart) is None  # ... in two storages: the first cannot be viewed past its end
    freed = torch.arange(24.).reshape(6, 4)
    views = [freed[:2], freed[2:]]
    freed.untyped_storage().resize_(0)  # as Gemini leaves its parameters between uses
    assert side_by_side(views) is None
    mixed = [torch.nn.Parameter(torch.ones(2, 4)), torch.nn.Parameter(torch.ones(2, 4, dtype=torch.bfloat16))]
    pointers = [p.data_ptr() for p in mixed]
    assert not place_side_by_side(mixed) and [p.data_ptr() for p in mixed] == pointers  # left as they were


def test_plain_linears_share_one_gemm_and_other_layers_run_apart(monkeypatch):
    """Plain layers take the fused path (one concat_linear for q/k/v and one for gate/up per layer, o and down
    through it alone); replaced layers (tensor parallelism) run one by one through their own forward, with the same
    result."""
    import model.llama as llama

    torch.manual_seed(0)
    model = LlamaForCausalLM(SMALL, resolve_kernels("reference"))
    ids = torch.randint(0, 300, (2, 12))
    calls = []
    real = llama.concat_linear
    monkeypatch.setattr(llama, "concat_linear", lambda x, *w: calls.append(len(w)) or real(x, *w))
    fused = model(ids, labels=ids)
    assert calls == [3, 1, 2, 1] * SMALL.num_hidden_layers  # q/k/v, o, gate/up, down
    for layer in model.model.layers:
        for parent, name in [(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
                            [(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]:
            plain = getattr(parent, name)
            replaced = CountingLinear(plain.in_features, plain.out_features, bias=False)
            replaced.weight = plain.weight
            setattr(parent, name, replaced)
    calls.clear()
    apart = model(ids, labels=ids)
    assert calls == []
    assert torch.allclose(fused, apart, atol=1e-6)
