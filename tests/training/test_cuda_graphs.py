"""--cuda_graphs (model/cuda_graphs.py): the decoder layers replayed as CUDA graphs train like the eager layers.

CPU: the flag's refusals. GPU: the tiny model replayed against the same model run eagerly, micro-batch by micro-batch
(the same losses, the same summed gradients, a new capture when a weight moves or the shape changes, evaluation
left eager), and pretrain.py with and without the flag under zero2 and zero2_cpu.

  . .whl/gpu-env.sh && python3 -m pytest -m gpu -s tests/training/test_cuda_graphs.py
"""
import dataclasses

import pytest
import torch
from entry_points import pretrain_flags
from gpu_runs import assert_losses_match, logged_losses, pretrain, sample_work

from model.config import CONFIGS
from model.kernels import resolve_kernels
from model.kernels.in_place_grads import weight_grads_summed_in_place
from model.llama import LlamaForCausalLM

# ---- the flag's refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["-p", "gemini"], "does not work with -p gemini, which moves the weights"),
    (["-p", "gemini_auto"], "does not work with -p gemini_auto"),
    (["-p", "hybrid_parallel"], "does not work with -p hybrid_parallel, which splits the layers"),
    (["-p", "ddp"], "does not work with -p ddp, which holds the weights' gradient accumulators"),
    (["-p", "zero2", "--attention_scope", "document"], "plain causal rows only.*--attention_scope sequence"),
    (["-p", "zero2", "-g"], "without recomputation: leave out -g"),
    (["-p", "zero2", "-g", "3"], "without recomputation: leave out -g"),
    (["-p", "zero2", "--compile"], "choose one"),
])
def test_layouts_graphs_cannot_replay_are_one_clear_line(monkeypatch, argv, message):
    from training import args as flag_defs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the checks after the GPU's own
    args = pretrain_flags("--cuda_graphs", "--attention_scope", "sequence", *argv)
    with pytest.raises(SystemExit, match="error: --cuda_graphs .*" + message):
        flag_defs.validate(args)


def test_graphs_need_a_gpu(monkeypatch):
    from training import args as flag_defs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="error: --cuda_graphs needs a CUDA GPU"):
        flag_defs.validate(pretrain_flags("--cuda_graphs", "--attention_scope", "sequence", "-p", "ddp"))


def test_graphable_flags_pass(monkeypatch):
    from training import args as flag_defs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for plugin in ("zero2", "zero1", "zero2_cpu"):
        flag_defs.validate(pretrain_flags("--cuda_graphs", "--attention_scope", "sequence", "-p", plugin, "-g", "0"))


# ---- the model, replayed against itself eagerly -------------------------------------------------------------------
CONFIG = dataclasses.replace(CONFIGS["tiny"], num_hidden_layers=3)
MICRO_BATCHES, BATCH, SEQ = 3, 4, 128


def _model(graphed: bool, dtype: torch.dtype = torch.bfloat16) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG, resolve_kernels("auto"), document_causal=False).cuda().to(dtype)
    model.place_fused_weights_side_by_side()  # as training/plugins.py does for zero2 and ddp
    if graphed:
        model.use_cuda_graphs()
    return model.train()


def _batches(seed: int, batch: int = BATCH):
    generator = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(0, CONFIG.vocab_size, (batch, SEQ), generator=generator).cuda() for _ in range(2))
            for _ in range(MICRO_BATCHES)]


def _accumulate(model, batches) -> list[float]:
    """Forward and backward of each micro-batch as training/loop.py runs them (in-place sums for every micro-batch
    but the last; float32 weights under autocast, as -p ddp -x bf16). Returns their losses."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=model.lm_head.weight.dtype == torch.float32)
    losses = []
    for index, (ids, labels) in enumerate(batches):
        with autocast:
            loss = model(ids, labels=labels)
        with weight_grads_summed_in_place(index < len(batches) - 1):
            loss.backward()
        losses.append(loss.item())
    return losses


def _step(model, batches, lr: float = 0.05) -> list[float]:
    """One optimizer step: _accumulate, then plain SGD written into the weights in place, as the plugins write
    theirs. Returns the micro-batches' losses."""
    losses = _accumulate(model, batches)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=-lr)
            p.grad = None
    return losses


def _gradients(model, batches) -> dict[str, torch.Tensor]:
    _accumulate(model, batches)
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_close_losses(graphed: list[float], eager: list[float]) -> None:
    assert graphed == pytest.approx(eager, rel=1e-3), f"graphed {graphed} vs eager {eager}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32_autocast"])
def test_replayed_layers_sum_the_gradients_eager_layers_do(dtype):
    eager, graphed = _model(False, dtype), _model(True, dtype)
    batches = _batches(1)
    expected, actual = _gradients(eager, batches), _gradients(graphed, batches)
    assert graphed.layer_graphs.captures == 1
    for name, grad in expected.items():
        # eager sums bf16 gradients in AccumulateGrad's kernel at the last micro-batch, the graph inside the GEMM
        error = (actual[name] - grad).norm() / grad.norm()
        assert error < 1e-2, f"{name}: gradient off by {error:.2e} of its norm"


@pytest.mark.gpu
def test_replayed_layers_train_like_eager_ones_and_capture_again_when_needed():
    eager, graphed = _model(False), _model(True)
    for step in range(3):  # the weights change in place between steps: the same capture reads them
        _assert_close_losses(_step(graphed, _batches(step)), _step(eager, _batches(step)))
    assert graphed.layer_graphs.captures == 1

    for model in (eager, graphed):  # a weight moved (as a load that replaces .data would): captured again
        layer = model.model.layers[1].mlp.down_proj
        layer.weight.data = layer.weight.data.clone()
    _assert_close_losses(_step(graphed, _batches(10)), _step(eager, _batches(10)))
    assert graphed.layer_graphs.captures == 2

    smaller = _batches(11, batch=2)  # another shape: captured again
    _assert_close_losses(_step(graphed, smaller), _step(eager, smaller))
    assert graphed.layer_graphs.captures == 3

    ids = _batches(12)[0][0]
    with torch.no_grad():  # evaluation stays eager
        torch.testing.assert_close(graphed.eval()(ids), eager.eval()(ids), rtol=2e-2, atol=2e-2)
    assert graphed.layer_graphs.captures == 3


# ---- pretrain.py with and without the flag ------------------------------------------------------------------------
STEPS = 8


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    # two micro-batches per step of gpu_runs.TINY's 4 x 256, so that the in-place sums and the hand-over both run
    return sample_work(tmp_path_factory.mktemp("cuda_graphs"), "--kernels", "auto", "--attention_scope", "sequence",
                       "--global_batch_tokens", str(2 * 4 * 256), "--max_steps", str(STEPS))


@pytest.mark.gpu
@pytest.mark.parametrize("plugin", ["zero2", "zero2_cpu"])
def test_pretrain_with_graphs_trains_like_without(work, plugin):
    eager = logged_losses(pretrain(work, f"eager-{plugin}", "-p", plugin, nproc=1) / "tb")
    graphed = logged_losses(pretrain(work, f"graphed-{plugin}", "-p", plugin, "--cuda_graphs", nproc=1) / "tb")
    assert sorted(graphed) == list(range(1, STEPS + 1)) and eager[STEPS] < eager[1]
    assert_losses_match(f"{plugin} --cuda_graphs", graphed, eager, reference="eager")
