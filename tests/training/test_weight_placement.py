"""training/plugins.py place_weights_for_plugin: which plugins get their model cast, moved and its projection
weights laid side by side before boosting, on the CPU (the GPU side, with LowLevelZero's steps, is in
tests/model/test_plugins_gpu.py)."""
import dataclasses

import pytest
import torch

from model.config import CONFIGS
from model.kernels.concat_linear import side_by_side
from model.llama import LlamaForCausalLM
from training.plugins import place_weights_for_plugin

SMALL = dataclasses.replace(CONFIGS["tiny"], num_hidden_layers=2, vocab_size=300)


def placed_groups(model: LlamaForCausalLM) -> int:
    return sum(side_by_side(group) is not None for group in model.fused_weight_groups())


@pytest.mark.parametrize("plugin, precision, dtype, placed", [
    ("ddp", "bf16", torch.float32, 4),  # autocast trains float32 weights
    ("zero2", "bf16", torch.bfloat16, 4), ("zero2_cpu", "fp16", torch.float16, 4),
    ("zero2", "fp32", torch.float32, 4),
    ("gemini", "bf16", torch.float32, 0), ("hybrid_parallel", "bf16", torch.float32, 0),  # their own layouts
])
def test_eager_plugins_get_the_plugins_dtype_and_weights_side_by_side(plugin, precision, dtype, placed):
    torch.manual_seed(0)
    model = LlamaForCausalLM(SMALL)
    expected = {name: p.to(dtype) for name, p in model.named_parameters()}
    place_weights_for_plugin(model, plugin, precision)
    assert placed_groups(model) == placed
    for name, parameter in model.named_parameters():
        assert parameter.dtype == dtype and torch.equal(parameter, expected[name]), name


def test_models_without_the_method_are_left_alone():
    """--baseline hf builds transformers' model, which has no projection groups to place."""
    model = torch.nn.Linear(4, 4)
    weight = model.weight
    place_weights_for_plugin(model, "zero2", "bf16")
    assert model.weight is weight and model.weight.dtype == torch.float32
