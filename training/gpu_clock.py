"""The GPU's SM clock and power draw over the timed steps, sampled through NVML (nvidia-ml-py) on a thread.

Why: an H100 SXM running the 1b step reaches its 700 W power limit and lowers its SM clock from 1980 MHz to about
1600 (measured on 2026-11-23, `nvidia-smi` every 0.5 s), and every kernel, matmuls and cuDNN attention included,
slows with it. GPUs of one kind hold different clocks at their limit, so the same command gives a few percent more
or less tokens/s on another machine; the clock and power in the benchmark's line say which one ran slower.
Readings are this process's GPU only (rank 0's in benchmark.py).

At its power limit a GPU's tokens/s is its power over its energy per token, so two models compared on one board
differ by their energy per token; the board's energy counter, read at the ends of the timed steps, gives it.
"""
from __future__ import annotations

import threading
from typing import Callable

SAMPLE_INTERVAL_S = 0.1  # NVML averages its own readings over 1/6 to 1 s; finer sampling adds nothing


class ReadingMeans:
    """Running means of (sm_clock_mhz, power_w) readings: sums, so a week-long run holds three numbers."""

    def __init__(self):
        self.count, self.clock_sum, self.power_sum = 0, 0.0, 0.0

    def add(self, clock_mhz: float, power_w: float) -> None:
        self.count += 1
        self.clock_sum += clock_mhz
        self.power_sum += power_w

    def means(self) -> dict:
        if not self.count:
            return {}
        return {"sm_clock_mhz": round(self.clock_sum / self.count), "power_w": round(self.power_sum / self.count, 1)}


class GpuClockSampler:
    """Mean SM clock (MHz) and power draw (W) from start() to stop(), and per window (the logging interval), read
    every SAMPLE_INTERVAL_S.

    `read` returns one (sm_clock_mhz, power_w) reading; `limits` are constants of the board reported beside the
    run's means (its highest SM clock and its power limit). `energy`, where the board counts it, returns the joules
    it has used since some fixed point (the driver's start): the caller reads it when it likes (energy_j)."""

    def __init__(self, read: Callable[[], tuple[float, float]], limits: dict, interval_s: float = SAMPLE_INTERVAL_S,
                 energy: Callable[[], float] | None = None):
        self.read = read
        self.limits = limits
        self.energy = energy
        self.interval_s = interval_s
        self._run, self._window = ReadingMeans(), ReadingMeans()
        self._lock = threading.Lock()  # the sampling thread adds while the training thread takes windows
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._run, self._window = ReadingMeans(), ReadingMeans()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="gpu-clock-sampler", daemon=True)
        self._thread.start()

    def window(self) -> dict:
        """The means since the last window() (or start()); {} if nothing was read in between."""
        with self._lock:
            window, self._window = self._window, ReadingMeans()
        return window.means()

    def stop(self) -> dict:
        """Stop sampling; the means since start() with the board's limits, or {} if nothing was read."""
        if self._thread is None:
            return {}
        self._stop.set()
        self._thread.join()
        self._thread = None
        means = self._run.means()
        return {**means, **self.limits} if means else {}

    def energy_j(self) -> float | None:
        """The board's energy counter now, in joules; None where it has none."""
        return self.energy() if self.energy is not None else None

    def _sample(self) -> None:
        while True:  # read first: a window shorter than one interval still gets a reading
            clock_mhz, power_w = self.read()
            with self._lock:
                self._run.add(clock_mhz, power_w)
                self._window.add(clock_mhz, power_w)
            if self._stop.wait(self.interval_s):
                return


def for_current_gpu() -> GpuClockSampler | None:
    """A sampler for this process's CUDA device; None without a GPU or without nvidia-ml-py (requirements.txt)."""
    import torch

    if not torch.cuda.is_available() or torch.version.hip:
        return None
    try:
        import pynvml
    except ImportError:
        return None
    # by UUID: NVML numbers every GPU of the host, CUDA only the visible ones (CUDA_VISIBLE_DEVICES, torchrun)
    uuid = torch.cuda.get_device_properties(torch.cuda.current_device()).uuid
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    except pynvml.NVMLError:  # no NVML driver library, or a device it does not list (a MIG slice): no readings
        return None

    def read() -> tuple[float, float]:
        milliwatts = pynvml.nvmlDeviceGetPowerUsage(handle)
        return float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)), milliwatts / 1000

    def energy_j() -> float:
        return pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000  # millijoules since the driver loaded

    try:
        energy_j()
    except pynvml.NVMLError:  # boards before Volta count no energy
        energy_j = None
    limits = {"sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
              "power_limit_w": round(pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000, 1)}
    return GpuClockSampler(read, limits, energy=energy_j)
