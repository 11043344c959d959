"""The suite's Llama on its own: configs, packing, kernel tables, clear errors."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

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


def test_plain_linears_share_one_gemm_and_other_layers_run_apart(monkeypatch):
    """Plain layers take the fused path (one concat_linear for q/k/v and one for gate/up per layer); replaced
    layers (tensor parallelism) run one by one through their own forward, with the same result."""
    import model.llama as llama

    torch.manual_seed(0)
    model = LlamaForCausalLM(SMALL, resolve_kernels("reference"))
    ids = torch.randint(0, 300, (2, 12))
    calls = []
    real = llama.concat_linear
    monkeypatch.setattr(llama, "concat_linear", lambda x, *w: calls.append(len(w)) or real(x, *w))
    fused = model(ids, labels=ids)
    assert calls == [3, 2] * SMALL.num_hidden_layers
    for layer in model.model.layers:
        for parent, name in [(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj")] + \
                            [(layer.mlp, n) for n in ("gate_proj", "up_proj")]:
            plain = getattr(parent, name)
            replaced = CountingLinear(plain.in_features, plain.out_features, bias=False)
            replaced.weight = plain.weight
            setattr(parent, name, replaced)
    calls.clear()
    apart = model(ids, labels=ids)
    assert calls == []
    assert torch.allclose(fused, apart, atol=1e-6)
