"""Per-op kernel backends. Each op module holds a table BACKENDS from name to function, with the plain
PyTorch reference beside the fast ones; `resolve_kernels` turns names into functions once, at build time.

Asking for a backend that does not exist, or whose package is missing, is an error, never a silent fallback.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import attention, loss, rmsnorm, rotary, swiglu

OP_TABLES = {
    "attention": attention.BACKENDS,
    "rms_norm": rmsnorm.BACKENDS,
    "rotary": rotary.BACKENDS,
    "swiglu": swiglu.BACKENDS,
    "loss": loss.BACKENDS,
}

# A preset names one backend per op; per-op overrides replace single entries.
PRESETS = {
    "torch": {"attention": "sdpa", "rms_norm": "torch", "rotary": "torch", "swiglu": "torch", "loss": "torch"},
    # The slow, explicit references every fast path is checked against.
    "reference": {"attention": "math", "rms_norm": "torch", "rotary": "torch", "swiglu": "torch", "loss": "torch"},
}


@dataclass(frozen=True)
class Kernels:
    """The resolved functions, and the names they came from (for logs and checkpoints)."""

    attention: Callable
    rms_norm: Callable
    rotary: Callable
    swiglu: Callable
    loss: Callable
    names: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        return ", ".join(f"{op}={name}" for op, name in self.names)


def resolve_kernels(preset: str = "torch", overrides: dict[str, str] | None = None) -> Kernels:
    if preset not in PRESETS:
        raise ValueError(f"unknown kernel preset '{preset}': expected one of {', '.join(PRESETS)}")
    names = {**PRESETS[preset], **(overrides or {})}
    functions = {}
    for op, name in names.items():
        if op not in OP_TABLES:
            raise ValueError(f"unknown kernel op '{op}': expected one of {', '.join(OP_TABLES)}")
        table = OP_TABLES[op]
        if name not in table:
            raise ValueError(f"unknown {op} backend '{name}': expected one of {', '.join(table)}")
        functions[op] = table[name]
    return Kernels(**functions, names=tuple(names.items()))
