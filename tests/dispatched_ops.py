"""Which aten ops a block of code dispatches, for tests that count kernels (a launch per op on a GPU)."""
from torch.utils._python_dispatch import TorchDispatchMode


class DispatchedOps(TorchDispatchMode):
    """`with DispatchedOps() as ops:` records every aten op run inside, in order, in ops.calls."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))
