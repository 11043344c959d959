"""training/gpu_clock.py: the sampler's means and window, Throughput's use of it, and real NVML readings on a GPU."""
import itertools
import time

import pytest
import torch

from training import gpu_clock, metrics

LIMITS = {"sm_clock_max_mhz": 1980, "power_limit_w": 700.0}


class CountingReader:
    """Readings (1000 + n MHz, 500 + n W) for the n-th call, so the mean tells how many calls were made."""

    def __init__(self):
        self.calls = itertools.count()
        self.count = 0

    def __call__(self) -> tuple[float, float]:
        n = next(self.calls)
        self.count = n + 1
        return 1000.0 + n, 500.0 + n


def started_sampler(interval_s: float = 0.005) -> tuple[CountingReader, gpu_clock.GpuClockSampler]:
    reader = CountingReader()
    sampler = gpu_clock.GpuClockSampler(reader, LIMITS, interval_s=interval_s)
    sampler.start()
    return reader, sampler


def test_sampler_means_its_readings_between_start_and_stop():
    reader, sampler = started_sampler()
    time.sleep(0.1)
    means = sampler.stop()
    taken = reader.count
    assert taken >= 3  # read every 5 ms, not once
    assert means == {"sm_clock_mhz": round(1000 + (taken - 1) / 2), "power_w": round(500 + (taken - 1) / 2, 1),
                     **LIMITS}
    time.sleep(0.03)
    assert reader.count == taken  # stopped means stopped
    assert sampler.stop() == {}  # stopping twice reads nothing more


def test_windows_split_the_readings_in_order():
    reader, sampler = started_sampler()
    time.sleep(0.1)
    first = sampler.window()
    time.sleep(0.1)
    second = sampler.window()
    run = sampler.stop()
    taken = reader.count
    assert run["sm_clock_mhz"] == round(1000 + (taken - 1) / 2)  # windows do not reset the run's means
    # readings count up: the first window holds the lowest, the second only later ones (above the run's mean)
    assert 1000 <= first["sm_clock_mhz"] < run["sm_clock_mhz"] < second["sm_clock_mhz"] <= 1000 + taken - 1
    assert "power_limit_w" not in first  # the board's limits come once, with the run's means


def test_a_window_shorter_than_one_interval_still_gets_a_reading():
    _, sampler = started_sampler(interval_s=10.0)
    started = time.perf_counter()
    assert sampler.stop()["sm_clock_mhz"] == 1000
    assert time.perf_counter() - started < 5  # stop() does not sit out the interval


def test_throughput_samples_the_clock_over_the_timed_steps_only():
    reader = CountingReader()
    clock = gpu_clock.GpuClockSampler(reader, LIMITS, interval_s=0.005)
    throughput = metrics.Throughput(flops_per_token=1.0, world_size=1, warmup_steps=2, clock=clock)
    throughput.step_done(100)
    time.sleep(0.03)
    assert reader.count == 0  # warming up: not sampled
    throughput.step_done(100)  # the warm-up's end opens the timed window
    time.sleep(0.05)
    throughput.step_done(100)
    assert throughput.rate()["sm_clock_mhz"] >= 1000  # the logging window's clock, for TensorBoard
    summary = throughput.summary()
    assert summary["tokens_per_s_per_gpu"] > 0
    assert summary["sm_clock_mhz"] >= 1000 and summary["power_limit_w"] == 700.0
    assert throughput.summary() == summary  # summary() again: the same means, sampling stays stopped


def test_throughput_without_a_clock_reports_no_clock_fields():
    throughput = metrics.Throughput(flops_per_token=1.0, world_size=1, warmup_steps=0)
    throughput.step_done(100)
    assert "sm_clock_mhz" not in throughput.summary()


@pytest.mark.gpu
def test_nvml_reads_this_gpus_clock_and_power_under_load():
    sampler = gpu_clock.for_current_gpu()
    assert sampler is not None, "install nvidia-ml-py (requirements.txt)"
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    sampler.start()
    for _ in range(200):
        a = (a @ a).clamp_(-1, 1)
    torch.cuda.synchronize()
    means = sampler.stop()
    assert 300 <= means["sm_clock_mhz"] <= means["sm_clock_max_mhz"] <= 4000
    assert 10 < means["power_w"] <= 1.2 * means["power_limit_w"], means


class CountingEnergy:
    """The board's energy counter: 1,000 J at first, 50 J more at each reading."""

    def __init__(self):
        self.readings = 0

    def __call__(self) -> float:
        self.readings += 1
        return 1000.0 + 50.0 * (self.readings - 1)


def test_energy_per_token_is_this_gpus_joules_over_its_share_of_the_timed_tokens():
    energy = CountingEnergy()
    clock = gpu_clock.GpuClockSampler(CountingReader(), LIMITS, interval_s=0.005, energy=energy)
    throughput = metrics.Throughput(flops_per_token=1.0, world_size=2, warmup_steps=1, clock=clock)
    throughput.step_done(4000)
    assert energy.readings == 1  # read when the warm-up ends, not during it
    for _ in range(3):
        throughput.step_done(4000)
    assert energy.readings == 4
    summary = throughput.summary()
    # 150 J between the timed steps' ends over 3 x 4,000 tokens, of which this GPU trained half
    assert summary["energy_mj_per_token"] == pytest.approx(150.0 * 1000 / 6000)
    assert energy.readings == 4  # summary() reads nothing more: time after the last step is not the steps'


def test_a_board_without_an_energy_counter_reports_no_energy():
    clock = gpu_clock.GpuClockSampler(CountingReader(), LIMITS, interval_s=0.005)
    throughput = metrics.Throughput(flops_per_token=1.0, world_size=1, warmup_steps=0, clock=clock)
    throughput.step_done(100)
    summary = throughput.summary()
    assert "energy_mj_per_token" not in summary and "sm_clock_mhz" in summary


@pytest.mark.gpu
def test_nvml_counts_this_gpus_energy_under_load():
    sampler = gpu_clock.for_current_gpu()
    assert sampler is not None and sampler.energy is not None, "install nvidia-ml-py (requirements.txt)"
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    before, started = sampler.energy_j(), time.perf_counter()
    for _ in range(200):
        a = (a @ a).clamp_(-1, 1)
    torch.cuda.synchronize()
    joules, seconds = sampler.energy_j() - before, time.perf_counter() - started
    assert 10 * seconds < joules < 1.2 * sampler.limits["power_limit_w"] * seconds + 5, (joules, seconds)


def test_the_closing_line_names_the_clock_power_and_energy_where_measured(capsys):
    from types import SimpleNamespace

    from training.loop import Trainer

    trainer = SimpleNamespace(state=SimpleNamespace(step=10, tokens_seen=40960), total_steps=10, validations=[],
                              is_main=True, print=lambda *values: print(*values))
    trainer.summary = {"tokens_per_s_per_gpu": 78110.3, "mfu": 0.6087, "peak_mem_gib": 27.16, "sm_clock_mhz": 1635,
                       "sm_clock_max_mhz": 1980, "power_w": 691.7, "power_limit_w": 700.0,
                       "energy_mj_per_token": 8.7934}
    Trainer.report(trainer, [10.0, 5.0])
    line = capsys.readouterr().out
    assert "SM clock 1,635 of 1,980 MHz at 692 of 700 W; 8.79 mJ per token" in line, line
    del trainer.summary["energy_mj_per_token"]  # a board without an energy counter
    Trainer.report(trainer, [10.0, 5.0])
    assert "per token" not in capsys.readouterr().out
