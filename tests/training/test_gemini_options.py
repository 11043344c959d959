"""The -p gemini flags of training/args.py and the options training/plugins.py derives from them."""
import pytest

from entry_points import pretrain_flags as flags

from training.plugins import gemini_prefetch, shard_param_frac


def test_parameters_stay_whole_on_one_gpu_and_are_sharded_on_several():
    assert shard_param_frac(flags("-p", "gemini"), world_size=1) == 0.0
    assert shard_param_frac(flags("-p", "gemini"), world_size=2) == 1.0


def test_prefetch_defaults_to_four_chunks_on_several_gpus_and_none_on_one():
    assert gemini_prefetch(flags("-p", "gemini"), world_size=2) == 4
    assert gemini_prefetch(flags("-p", "gemini"), world_size=1) == 0
    assert gemini_prefetch(flags("-p", "gemini", "--gemini_prefetch", "0"), world_size=2) == 0
    assert gemini_prefetch(flags("-p", "gemini_auto", "--gemini_prefetch", "2"), world_size=1) == 2


def test_parameters_offloaded_to_the_cpu_keep_their_chunks_sharded():
    args = flags("-p", "gemini", "--offload_optim_frac", "1", "--offload_param_frac", "0.5")
    assert shard_param_frac(args, world_size=1) == 1.0


@pytest.mark.parametrize("argv, message", [
    (["-p", "zero2", "--offload_param_frac", "0.5"], "--offload_param_frac applies to -p gemini"),
    (["-p", "gemini", "--offload_optim_frac", "1.5"], "--offload_optim_frac must be between 0 and 1, not 1.5"),
    (["-p", "gemini", "--offload_param_frac", "-0.1"], "--offload_param_frac must be between 0 and 1"),
    (["-p", "gemini", "--offload_param_frac", "0.5"], "needs --offload_optim_frac 1"),
    (["-p", "zero2", "--gemini_prefetch", "2"], "--gemini_prefetch applies to -p gemini and gemini_auto only"),
    (["-p", "gemini", "--gemini_prefetch", "-1"], "--gemini_prefetch must be 0 or more"),
])
def test_gemini_flags_it_cannot_honour_are_refused(argv, message):
    from training import args as flag_defs

    with pytest.raises(SystemExit, match=message):
        flag_defs.validate(flags(*argv))
