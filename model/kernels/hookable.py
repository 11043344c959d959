"""One wrapper that lets a package's custom kernel run under Colossal-AI's Gemini; every fused backend uses it.

Why: Gemini keeps parameters in chunks, and between uses a parameter's `.data` is a placeholder (released, or on
the CPU when offloaded). Gemini fetches the chunk only when a torch op touches the parameter, through
`ColoParameter.__torch_function__` (colossalai/tensor/colo_parameter.py). That same entry also wraps the op in two
autograd nodes: one re-fetches the chunk before the op's backward, the other marks the parameter "held after
backward" once the backward is done, which Gemini's gradient-reduction hook requires. `autograd.Function.apply`
does not go through `__torch_function__`, so a Triton kernel handed the raw parameter reads the placeholder
("Pointer argument cannot be accessed from Triton (cpu tensor?)", Liger's RMSNorm) and its weight gradient reaches
the reduction hook in the wrong state ("failed at the gradient reduction", Liger's fused linear cross-entropy).

`hookable(kernel)` makes the whole kernel one op of the `__torch_function__` protocol, as torch.nn.functional's own
entries are: when an argument is a tensor subclass that overrides it (ColoParameter, ColoTensor), the call is handed
to the subclass, which fetches the chunks, brackets forward and backward as it does for F.linear, and calls back
here with torch functions disabled. The kernel then gets plain tensors (`plain`), so the in-place torch ops in its
backward are not rewritten by ColoTensor (which turns `add_` into `add`). Without tensor subclasses (DDP, ZeRO, no
plugin) the call goes straight to the kernel.
"""
from __future__ import annotations

import functools

import torch


def plain(t):
    """`t` as a plain torch.Tensor with the same storage and autograd history; anything else unchanged. A plain
    nn.Parameter stays itself: it overrides no torch function, and a kernel may need the leaf (its .grad)."""
    if not isinstance(t, torch.Tensor) or type(t) in (torch.Tensor, torch.nn.Parameter):
        return t
    with torch._C.DisableTorchFunctionSubclass():  # else ColoTensor would wrap the result again
        return t.as_subclass(torch.Tensor)


def hookable(kernel):
    """Wrap `kernel(*tensors_and_scalars)` so that parameter hooks (Gemini's) see it as one op. See module doc."""

    @functools.wraps(kernel)
    def entry(*args):
        if torch.overrides.has_torch_function(args):
            return torch.overrides.handle_torch_function(entry, args, *args)
        return kernel(*(plain(a) for a in args))

    return entry
