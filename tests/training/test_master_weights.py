"""training/master_weights.py: the optimizer's float32 master weights go beside a checkpoint and come back after
colossalai's load has rebuilt them from the rounded weights. LowLevelZeroOptimizer on one and two gloo ranks here;
Gemini and the whole resume through pretrain.py on the GPU in tests/training/test_resume_gpu.py."""
from pathlib import Path
from unittest import mock

import pytest
import torch

from gloo_ranks import run_on_ranks, trained_low_level_zero
from training import master_weights


def _masters(model, optimizer) -> dict[str, torch.Tensor]:
    return {name: master.clone() for name, master in master_weights.master_weights(model, optimizer).items()}


def _assert_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys() and expected
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def _saved_and_restored(rank: int, world_size: int, folder: str, shard_bytes: int) -> None:
    model, optimizer = trained_low_level_zero(world_size)
    before, weights = _masters(model, optimizer), [p.detach().clone() for p in model.parameters()]
    with mock.patch.object(master_weights, "SHARD_BYTES", shard_bytes):
        master_weights.save(Path(folder), rank, model, optimizer)
    optimizer.update_master_params(model)  # what colossalai's load does: masters from the bf16 weights
    rebuilt = _masters(model, optimizer)
    assert any(not torch.equal(rebuilt[name], before[name]) for name in before)  # else this proves nothing
    assert master_weights.restore(Path(folder), rank, model, optimizer) is None
    _assert_equal(_masters(model, optimizer), before)
    for param, weight in zip(model.parameters(), weights):  # the rounded weights were right already
        assert torch.equal(param, weight)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("shard_bytes", [2 << 30, 1], ids=["one-file", "a-file-per-tensor"])
def test_master_weights_come_back_bit_for_bit(tmp_path, world_size, shard_bytes):
    run_on_ranks(_saved_and_restored, str(tmp_path), shard_bytes, world_size=world_size)
    files = sorted(path.name for path in tmp_path.iterdir())
    per_rank = 1 if shard_bytes > 1 else 4  # two weights and two biases
    assert files == [f"rank-{r:05d}-{i:05d}.safetensors" for r in range(world_size) for i in range(per_rank)]


def _save_only(rank: int, world_size: int, folder: str) -> None:
    model, optimizer = trained_low_level_zero(world_size)
    master_weights.save(Path(folder), rank, model, optimizer)


def _restore_elsewhere(rank: int, world_size: int, folder: str, reasons: list[str]) -> None:
    model, optimizer = trained_low_level_zero(world_size)
    optimizer.update_master_params(model)
    rebuilt = _masters(model, optimizer)
    reason = master_weights.restore(Path(folder), rank, model, optimizer)
    assert reason is not None and reasons[rank] in reason, reason
    _assert_equal(_masters(model, optimizer), rebuilt)  # left as colossalai rebuilt them, on every rank


def test_another_layout_keeps_the_rebuilt_master_weights_on_every_rank(tmp_path):
    """Saved by one rank, resumed on two: rank 0's file holds whole weights where it now has halves, rank 1 has none;
    both keep the copies rebuilt from the rounded weights."""
    run_on_ranks(_save_only, str(tmp_path), world_size=1)
    run_on_ranks(_restore_elsewhere, str(tmp_path), ["the shape of 0.weight differs", "no float32 master weights for rank 1"],
                 world_size=2)


def test_a_checkpoint_without_master_weights_says_so(tmp_path):
    run_on_ranks(_restore_elsewhere, str(tmp_path / "master"), ["no float32 master weights for rank 0"], world_size=1)


def _one_rank_only(rank: int, world_size: int, folder: str) -> None:
    """Rank 1 looks in a folder without its file: rank 0 could restore its own, but must not alone."""
    model, optimizer = trained_low_level_zero(world_size)
    master_weights.save(Path(folder) / "saved", rank, model, optimizer)
    optimizer.update_master_params(model)
    rebuilt = _masters(model, optimizer)
    looked_in = Path(folder) / ("saved" if rank == 0 else "elsewhere")
    reason = master_weights.restore(looked_in, rank, model, optimizer)
    assert reason == ("another rank's master weights were saved in another layout" if rank == 0
                      else f"the checkpoint has no float32 master weights for rank 1 ({looked_in})"), reason
    _assert_equal(_masters(model, optimizer), rebuilt)


def test_every_rank_restores_or_none_does(tmp_path):
    run_on_ranks(_one_rank_only, str(tmp_path), world_size=2)


def _float32_training(rank: int, world_size: int, folder: str) -> None:
    model, optimizer = trained_low_level_zero(world_size, dtype=torch.float32)
    assert master_weights.master_weights(model, optimizer) == {}  # the checkpoint's own weights are exact
    master_weights.save(Path(folder), rank, model, optimizer)
    assert master_weights.restore(Path(folder), rank, model, optimizer) is None


def test_float32_training_has_no_master_weights_to_save(tmp_path):
    run_on_ranks(_float32_training, str(tmp_path / "master"), world_size=1)
    assert not (tmp_path / "master").exists()


def test_plain_optimizers_have_none():
    model = torch.nn.Linear(3, 3)
    assert master_weights.master_weights(model, torch.optim.AdamW(model.parameters())) == {}


def test_mixed_precision_optimizers_are_found_by_parameter_name(tmp_path):
    """hybrid_parallel without ZeRO: colossalai's MixedPrecisionOptimizer keeps a float32 copy of each bf16 parameter,
    and hands the saved ones back bit for bit."""
    from colossalai.amp.naive_amp.mixed_precision_optimizer import MixedPrecisionOptimizer

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
    optimizer = MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()), precision="bf16")
    found = master_weights.master_weights(model, optimizer)
    assert list(found) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert all(found[name] is optimizer.working_to_master_map[p] for name, p in zip(found, model.parameters()))
    for master in found.values():
        master.add_(1e-4)  # low bits that the bf16 weights do not hold
    before = _masters(model, optimizer)
    master_weights.save(tmp_path, 0, model, optimizer)
    for master in found.values():
        master.copy_(master.bfloat16())
    assert master_weights.restore(tmp_path, 0, model, optimizer) is None
    _assert_equal(_masters(model, optimizer), before)
