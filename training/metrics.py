"""Throughput, MFU and memory; TensorBoard scalars and the progress bar. Only rank 0 writes or prints."""
from __future__ import annotations

import resource
import time

import torch

from .gpu_clock import GpuClockSampler

# Dense bf16 peak per GPU (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A800": 312e12, "H800": 989e12,
                   "L40S": 362e12, "A10G": 125e12, "L4": 121e12, "V100": 125e12, "4090": 165e12}

TAGS = {  # TensorBoard tag names, shared with the planner's run summary
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
    "tokens_per_s_per_gpu": "train/tokens_per_s_per_gpu", "mfu": "train/mfu",
    "peak_mem_gib": "train/peak_mem_gib", "tokens_seen": "train/tokens_seen",
    "val_loss": "val/loss", "val_ppl": "val/ppl",  # per source: val/<source>/loss, val/<source>/ppl
    "sm_clock_mhz": "gpu/sm_clock_mhz", "power_w": "gpu/power_w",  # rank 0's GPU: a throttled GPU shows here
}


def peak_flops_per_gpu() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_gpu_mem_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def resident_gpu_mem_gib() -> float:
    """GPU memory allocated now: between steps, the model and optimizer states without activations."""
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def host_mem_gib() -> float:
    """Peak resident memory of this process (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Throughput:
    """Tokens/s per GPU and MFU, timed from the end of the warm-up steps (compilation, allocator growth), and the
    GPU's mean SM clock and power over the same steps where `clock` samples them (training/gpu_clock.py), with its
    energy per token where the board counts energy (this GPU's joules over its share of the tokens)."""

    def __init__(self, flops_per_token: float, world_size: int, warmup_steps: int = 1,
                 clock: GpuClockSampler | None = None):
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.warmup_steps = warmup_steps
        self.peak_flops = peak_flops_per_gpu()
        self.steps = 0
        self._clock = clock
        self._clock_means: dict = {}
        self._energy_start = self._energy_end = None  # the board's counter (J) at the timed steps' ends
        self._start = self._window_start = None
        if warmup_steps == 0:
            self._open_window(time.perf_counter())
        self._end = None
        self._window_tokens = self.measured_tokens = 0

    def _open_window(self, now: float) -> None:
        self._start = self._window_start = now
        if self._clock is not None:
            self._clock.start()
            self._energy_start = self._clock.energy_j()

    def step_done(self, global_tokens: int) -> None:
        """Call after each optimizer step, once its result has been synchronised (loss.item())."""
        now = time.perf_counter()
        self.steps += 1
        if self.steps == self.warmup_steps:
            self._open_window(now)
        elif self.steps > self.warmup_steps:
            self._window_tokens += global_tokens
            self.measured_tokens += global_tokens
            self._end = now
            if self._clock is not None:
                self._energy_end = self._clock.energy_j()

    def rate(self) -> dict:
        """Metrics for the steps since the last call; empty while warming up."""
        if not self._window_tokens:
            return {}
        metrics = self._metrics(self._window_tokens, self._end - self._window_start)
        self._window_start, self._window_tokens = self._end, 0
        if self._clock is not None:
            metrics.update(self._clock.window())
        return metrics

    def close(self) -> None:
        """End the clock's sampling (the run finished or failed); summary() reports what it read until now."""
        if self._clock is not None:
            self._clock_means = self._clock.stop()
            self._clock = None

    def summary(self) -> dict:
        """Metrics over every step after the warm-up."""
        self.close()
        if not self.measured_tokens:
            return {}
        summary = {**self._metrics(self.measured_tokens, self._end - self._start), **self._clock_means}
        if self._energy_start is not None and self._energy_end is not None:
            tokens_per_gpu = self.measured_tokens / self.world_size
            summary["energy_mj_per_token"] = (self._energy_end - self._energy_start) * 1000 / tokens_per_gpu
        return summary

    def _metrics(self, tokens: int, seconds: float) -> dict:
        tokens_per_s_per_gpu = tokens / seconds / self.world_size
        metrics = {"tokens_per_s_per_gpu": tokens_per_s_per_gpu}
        if self.peak_flops:
            metrics["mfu"] = tokens_per_s_per_gpu * self.flops_per_token / self.peak_flops
        return metrics


class Logger:
    """TensorBoard scalars and a tqdm postfix, on rank 0 only."""

    def __init__(self, log_dir: str | None, is_main: bool):
        self.is_main = is_main
        self.writer = None
        if is_main and log_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir)

    def scalars(self, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if value is not None:
                self.writer.add_scalar(TAGS.get(key, key), value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def postfix(values: dict) -> dict:
    """Short, readable progress-bar fields."""
    out = {}
    if "loss" in values:
        out["loss"] = f"{values['loss']:.4f}"
    if "lr" in values:
        out["lr"] = f"{values['lr']:.2e}"
    if "tokens_per_s_per_gpu" in values:
        out["tok/s/gpu"] = f"{values['tokens_per_s_per_gpu']:,.0f}"
    if "mfu" in values:
        out["mfu"] = f"{100 * values['mfu']:.1f}%"
    if values.get("peak_mem_gib"):
        out["mem"] = f"{values['peak_mem_gib']:.1f}G"
    return out
