"""The suite's Llama against transformers' LlamaForCausalLM holding the same weights (fp32, CPU)."""
import dataclasses

import pytest
import torch
import transformers

from model.config import CONFIGS, LlamaConfig
from model.hf_io import load_hf_checkpoint, save_hf_checkpoint
from model.kernels import resolve_kernels
from model.llama import LlamaForCausalLM

MHA = dataclasses.replace(CONFIGS["tiny"], num_hidden_layers=2, num_key_value_heads=8, vocab_size=512)
GQA = dataclasses.replace(CONFIGS["tiny"], num_hidden_layers=2, num_key_value_heads=2, vocab_size=512)


def hf_model(config: LlamaConfig) -> transformers.LlamaForCausalLM:
    hf_config = transformers.LlamaConfig(**config.to_hf_dict())
    return transformers.LlamaForCausalLM(hf_config).eval()


def tokens(config, batch=2, seq=48, seed=0):
    return torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config", [MHA, GQA], ids=["multi-head", "grouped-query"])
@pytest.mark.parametrize("preset", ["reference", "torch"])
def test_logits_match_transformers(config, preset):
    torch.manual_seed(0)
    theirs = hf_model(config)
    ours = LlamaForCausalLM(config, resolve_kernels(preset)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ids = tokens(config)
    with torch.no_grad():
        expected = theirs(ids).logits
        actual = ours(ids)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config", [MHA, GQA], ids=["multi-head", "grouped-query"])
def test_loss_matches_transformers(config):
    """HF shifts unshifted labels inside; the suite takes labels already shifted."""
    torch.manual_seed(0)
    theirs = hf_model(config)
    ours = LlamaForCausalLM(config).eval()
    ours.load_state_dict(theirs.state_dict())
    ids = tokens(config)
    shifted = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, labels=shifted), theirs(ids, labels=ids).loss, atol=1e-5, rtol=1e-5)


def test_saved_weights_load_in_transformers(tmp_path):
    torch.manual_seed(1)
    ours = LlamaForCausalLM(GQA).eval()
    # a small shard limit forces several shards and an index, as large models get
    save_hf_checkpoint(ours.state_dict(), GQA, tmp_path, max_shard_bytes=1 << 20)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = tokens(GQA, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_transformers_weights_load_in_suite(tmp_path):
    torch.manual_seed(2)
    theirs = hf_model(MHA)
    theirs.save_pretrained(tmp_path)
    config, state = load_hf_checkpoint(tmp_path)
    assert config.num_key_value_heads == MHA.num_key_value_heads and config.vocab_size == MHA.vocab_size
    ours = LlamaForCausalLM(config).eval()
    ours.load_state_dict(state, strict=True)
    ids = tokens(MHA, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    save_hf_checkpoint(LlamaForCausalLM(MHA).state_dict(), MHA, tmp_path)
    other = dataclasses.replace(GQA, name="gqa")
    other.save_hf(tmp_path)  # config says grouped-query, weights are multi-head
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_hf_checkpoint(tmp_path)
