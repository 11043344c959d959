"""Per-op kernel backends. Each op module holds a table BACKENDS from name to function, with the plain
PyTorch reference beside the fast ones, and REQUIRES naming the packages a backend needs beyond torch;
`resolve_kernels` turns names into functions once, at build time.

Asking for a backend that does not exist, or whose package is missing, is an error, never a silent fallback.
Packages are imported only when a backend that needs them is resolved, so importing this on a CPU machine
loads neither Triton nor Liger. Every backend that calls a package's kernel goes through `hookable.hookable`,
which makes it safe under Gemini (see that module).

No xformers backends: its rms_norm has no backward and its SwiGLU op includes the projections, so none of its ops
fits these signatures for training.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from . import add_rmsnorm, attention, loss, qkv_rotary, rmsnorm, rotary, swiglu, swiglu_packed

OPS = {"attention": attention, "rms_norm": rmsnorm, "add_rms_norm": add_rmsnorm, "rotary": rotary,
       "qkv_rotary": qkv_rotary, "swiglu": swiglu, "swiglu_packed": swiglu_packed, "loss": loss}
OP_TABLES = {op: module.BACKENDS for op, module in OPS.items()}

# How to install each package a backend may need.
PIP_HINTS = {
    "liger_kernel": "pip install liger-kernel",
    "triton": "pip install triton",
    "flash_attn": "pip install flash-attn --no-build-isolation",
    "flash_attn.cute": "pip install --pre flash-attn-4",
}

# A preset names one backend per op; per-op overrides replace single entries. `auto` is decided by `auto_preset`.
PRESETS = {
    # The slow, explicit references every fast path is checked against.
    "reference": {"attention": "math", "rms_norm": "torch", "add_rms_norm": "torch", "rotary": "torch",
                  "qkv_rotary": "torch", "swiglu": "torch", "swiglu_packed": "torch", "loss": "torch"},
    "torch": {"attention": "sdpa", "rms_norm": "torch", "add_rms_norm": "torch", "rotary": "torch",
              "qkv_rotary": "torch", "swiglu": "torch", "swiglu_packed": "torch", "loss": "torch"},
    # The suite's own Triton kernels fill three slots: Liger has no SwiGLU for a packed [gate | up] input and no
    # rotary on a packed [q | k | v] one, and its fused add + RMSNorm backward runs at 40% of memory bandwidth
    # (triton_rmsnorm.py).
    "liger": {"attention": "sdpa", "rms_norm": "liger", "add_rms_norm": "triton", "rotary": "liger",
              "qkv_rotary": "triton", "swiglu": "liger", "swiglu_packed": "triton", "loss": "liger"},
    "flash_attn": {"attention": "flash_attn", "rms_norm": "flash_attn", "add_rms_norm": "flash_attn",
                   "rotary": "flash_attn", "qkv_rotary": "flash_attn", "swiglu": "flash_attn",
                   "swiglu_packed": "flash_attn", "loss": "flash_attn"},
}
# What `auto` tries for the ops other than attention, fastest first; the reference `torch` when none is installed.
# The loss has one candidate: Liger's and flash-attn's fused losses need Triton too, so they never come second.
AUTO_CANDIDATES = {"rms_norm": ("liger", "flash_attn"), "add_rms_norm": ("triton", "liger", "flash_attn"),
                   "rotary": ("liger", "flash_attn"), "qkv_rotary": ("triton", "liger", "flash_attn"),
                   "swiglu": ("liger", "flash_attn"),
                   "swiglu_packed": ("triton", "flash_attn"), "loss": ("triton",)}
PRESET_NAMES = (*PRESETS, "auto")


@dataclass(frozen=True)
class Kernels:
    """The resolved functions, and the names they came from (for logs and checkpoints)."""

    attention: Callable
    rms_norm: Callable
    add_rms_norm: Callable
    rotary: Callable
    qkv_rotary: Callable
    swiglu: Callable
    swiglu_packed: Callable
    loss: Callable
    names: tuple[tuple[str, str], ...]
    preset: str = ""

    def backend(self, op: str) -> str:
        """The name of the backend resolved for `op`, e.g. backend("attention") -> "flash_attn4"."""
        return dict(self.names)[op]

    def describe(self) -> str:
        chosen = ", ".join(f"{op}={name}" for op, name in self.names)
        return f"{self.preset} ({chosen})" if self.preset else chosen


def missing_packages(op: str, backend: str) -> list[str]:
    """The packages `backend` of `op` needs that are not installed (empty when it can run here)."""
    return [name for name in OPS[op].REQUIRES.get(backend, ()) if not _installed(name)]


def _installed(name: str) -> bool:
    """Whether module `name` (dotted for a subpackage) can be found. A namespace package does not count: flash-attn-4
    installs `flash_attn/cute` without a `flash_attn/__init__.py`, which must not pass for flash-attn itself."""
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:  # a dotted name whose parent package is absent
        return False
    return spec is not None and spec.origin is not None


def auto_preset(float32: bool = False) -> dict[str, str]:
    """The fastest installed backends for the GPU present; the `torch` preset on a machine without CUDA.
    `float32`: the run trains in float32, so attention is SDPA of PyTorch's choice (the faster kernels are bf16/fp16).

    Attention: FlashAttention-4 on Hopper and later (sm90+) where flash-attn-4 is installed, else SDPA's cuDNN backend
    there; before Hopper the flash-attn package, else SDPA's flash backend (sm80+), else SDPA's own choice. Packed
    rows go to FlexAttention from the SDPA backends (attention.py). The other ops: Liger, or the suite's Triton kernels
    where they beat or fill in for Liger's (AUTO_CANDIDATES), else flash-attn's ops, else the references.
    `python3 -m model.kernels.bench` times them; on an H100 at the 1b shapes (batch 8 x 2048, forward + backward) it
    measured, in ms: attention causal sdpa_cudnn 1.89 (sdpa 1.82, flex 2.71; at batch 16 flash_attn4 2.67 against
    sdpa_cudnn 3.10-3.20), packed sdpa_cudnn->flex 3.03 (sdpa with a dense mask 4.36); rms_norm liger 1.54 (torch 1.99);
    rotary liger 1.28 (torch 2.14); swiglu liger 1.55 (torch 1.46, but Liger keeps one activation fewer per layer);
    loss liger 13.7 at 0.43 GiB peak (torch 16.9 at 5.86 GiB; liger_ce 10.4 at 1.16 GiB, holding the logits).
    At batch 16: qkv_rotary triton 0.89 (liger's rotary after splitting the projection: 1.16, torch 4.37); loss triton
    20.06 at 2.20 GiB (liger 20.69 at 2.32 GiB, with two waits for the GPU per call; torch 34.15 at 11.78 GiB).
    """
    if not torch.cuda.is_available():
        return dict(PRESETS["torch"])
    major, _ = torch.cuda.get_device_capability()
    if float32:
        attention_name = "sdpa"
    elif major >= 9:
        attention_name = "sdpa_cudnn" if missing_packages("attention", "flash_attn4") else "flash_attn4"
    elif not missing_packages("attention", "flash_attn"):
        attention_name = "flash_attn"
    elif major >= 8:
        attention_name = "sdpa_flash"
    else:
        attention_name = "sdpa"
    chosen = {"attention": attention_name}
    for op, candidates in AUTO_CANDIDATES.items():
        chosen[op] = next((name for name in candidates if not missing_packages(op, name)), "torch")
    return chosen


def resolve_kernels(preset: str = "torch", overrides: dict[str, str] | None = None, *,
                    float32: bool = False) -> Kernels:
    """One backend function per op from a preset name and per-op overrides, e.g. ("auto", {"attention": "flex"}).
    `float32`: the run trains in float32 (-x fp32), which half-precision-only attention cannot serve."""
    if preset not in PRESET_NAMES:
        raise ValueError(f"unknown kernel preset '{preset}': expected one of {', '.join(PRESET_NAMES)}")
    names = {**(auto_preset(float32) if preset == "auto" else PRESETS[preset]), **(overrides or {})}
    if float32 and names.get("attention") in attention.HALF_PRECISION_ONLY:
        raise ValueError(f"attention backend '{names['attention']}' runs in bf16 or fp16 only, and this run trains in "
                         "fp32: use -x bf16, or --kernel_override attention=sdpa")
    functions = {}
    for op, name in names.items():
        if op not in OP_TABLES:
            raise ValueError(f"unknown kernel op '{op}': expected one of {', '.join(OP_TABLES)}")
        table = OP_TABLES[op]
        if name not in table:
            raise ValueError(f"unknown {op} backend '{name}': expected one of {', '.join(table)}")
        _check_installed(op, name)
        functions[op] = table[name]
    return Kernels(**functions, names=tuple(names.items()), preset=preset)


def _check_installed(op: str, name: str) -> None:
    missing = missing_packages(op, name)
    if missing:
        hints = "; ".join(PIP_HINTS.get(package, f"pip install {package}") for package in missing)
        raise ValueError(
            f"{op} backend '{name}' needs the {', '.join(missing)} package{'s' if len(missing) > 1 else ''}, "
            f"not installed here: {hints}, or choose another backend (--kernels / --kernel_override {op}=...)"
        )
    for package in OPS[op].REQUIRES.get(name, ()):
        try:
            importlib.import_module(package)
        except Exception as error:  # an installed package that cannot load (e.g. built for another torch)
            raise ValueError(f"{op} backend '{name}': the {package} package is installed but fails to import: "
                             f"{type(error).__name__}: {error}") from error
