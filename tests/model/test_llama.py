"""The suite's Llama on its own: configs, packing, kernel tables, clear errors."""
import dataclasses

import pytest
import torch

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
