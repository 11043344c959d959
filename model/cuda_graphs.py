"""The decoder layers' forward and backward replayed as two CUDA graphs per micro-batch (`--cuda_graphs`).

Why: at small micro batches the host, not the GPU, sets the pace. At the 1b shape one layer's forward and backward
cost 3 to 4 ms of Python and kernel launches on the device hosts, about what the GPU needs for micro batch 2 of 2,048
tokens. Replayed, the whole stack is one launch each way: on an H100, zero2 at micro batch 2 went from 50k to 74k
tokens/s (cuDNN's attention) and held the power limit (docs/performance.md).

A graph fixes its shapes and the addresses of everything it reads and writes, so:
- The stack's inputs (the embeddings, rotary cos and sin) are copied into the graphs' own tensors at each call, and
  the outputs come back in the graphs' tensors, which the next micro-batch overwrites (after its backward has run).
- The parameters must stay where they were when captured: their addresses are compared at every call, and a
  moved parameter (a checkpoint load that replaced .data, say) makes the stack capture again. Gemini moves its
  parameters in and out of chunks all the time, so it cannot use graphs (training/args.py refuses).
- Weight gradients cannot go to .grad, which the plugins free or take over every step. The captured backward sums
  them into buffers of its own, inside the kernels as under kernels/in_place_grads.py (cuBLAS's beta = 1, the
  RMSNorm kernel's own sum), and the few that a kernel hands back are added there by the graph too. While the loop
  sums in place (the micro-batches of a step before its last) the backward gives autograd nothing for the weights;
  otherwise it hands autograd a copy of the sums, whose AccumulateGrad then calls the plugin's gradient hooks as
  usual, and clears them for the next step.
- Shapes are those of the first training forward; another shape (a shorter last batch) captures again.
- Rows with document masks need per-batch offsets on the host (varlen attention), and recomputation and pipeline
  stages run layers apart: those forwards, and evaluation, stay eager.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .kernels.in_place_grads import summing_weight_grads_in_place, weight_grads_summed_in_place

# run(x, cos, sin) -> (x, residual): the decoder layers one after another (model/llama.py run_layers)
RunLayers = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
WARMUP_PASSES = 2  # eager passes before capturing: Triton's autotuning and attention's compilation happen in them


@dataclass
class _Captured:
    """One capture: the two graphs and the tensors they read and write."""

    key: tuple
    forward: torch.cuda.CUDAGraph
    backward: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # x, cos, sin
    outputs: tuple[torch.Tensor, ...]  # x, residual (detached: each call hands autograd new views of them)
    output_grads: tuple[torch.Tensor, ...]  # what the backward graph reads: the gradients of `outputs`
    input_grad: torch.Tensor | None  # what it writes for x (None when x needs no gradient)


class LayerGraphs:
    """The layers of `layers` run through `run_layers` as a captured forward and backward (module doc)."""

    def __init__(self, layers: nn.Module, run_layers: RunLayers):
        self.layers, self.run_layers = layers, run_layers
        self.params = tuple(p for p in layers.parameters() if p.requires_grad)
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"--cuda_graphs: the layers' trainable weights must share one dtype, not {dtypes}")
        self.grad_sums_flat: torch.Tensor | None = None  # the weights' summed gradients, in parameter order
        self.grad_sums: tuple[torch.Tensor, ...] = ()  # views of grad_sums_flat shaped as the weights
        self.captured: _Captured | None = None
        self.captures = 0  # how many times the stack was captured (a test and the logs read it)

    def applies(self, x: torch.Tensor) -> bool:
        """Whether this forward can replay: training on CUDA with gradients on."""
        return x.is_cuda and torch.is_grad_enabled() and self.layers.training

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured = self._captured_for(x, cos, sin)
        return _Replay.apply(self, captured, x, cos, sin, *self.params)

    # ---- capture -----------------------------------------------------------------------------------------------
    def _key(self, x, cos, sin) -> tuple:
        shapes = tuple((t.shape, t.dtype) for t in (x, cos, sin))
        return shapes, x.requires_grad, torch.is_autocast_enabled("cuda"), tuple(p.data_ptr() for p in self.params)

    def _captured_for(self, x, cos, sin) -> _Captured:
        key = self._key(x, cos, sin)
        if self.captured is None or self.captured.key != key:
            self.captured = None  # its graphs and memory go before the new ones are made
            self.captured = self._capture(key, x, cos, sin)
        return self.captured

    def _capture(self, key, x, cos, sin) -> _Captured:
        if self.grad_sums_flat is None:
            first = self.params[0]
            self.grad_sums_flat = torch.zeros(sum(p.numel() for p in self.params), dtype=first.dtype,
                                              device=first.device)
            self.grad_sums = self._shaped_as_weights(self.grad_sums_flat)
        inputs = (x.detach().clone().requires_grad_(x.requires_grad), cos.detach().clone(), sin.detach().clone())
        with _autocast_without_cache():
            self._warm_up(inputs)
            forward, backward, pool = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle()
            with torch.cuda.graph(forward, pool=pool):
                outputs = self.run_layers(*inputs)
            output_grads = tuple(torch.empty_like(o) for o in outputs)
            with self._summing_into(self.grad_sums), torch.cuda.graph(backward, pool=pool):
                input_grad = self._backward(inputs, outputs, output_grads, self.grad_sums)
        self.captures += 1
        return _Captured(key, forward, backward, inputs, tuple(o.detach() for o in outputs), output_grads,
                         input_grad)

    def _warm_up(self, inputs) -> None:
        """Eager passes, summing into throwaway buffers, on a side stream as torch.cuda.graph captures: kernels
        compile and tune here, where they may synchronise, and not in the capture."""
        scratch = tuple(torch.zeros_like(s) for s in self.grad_sums)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self._summing_into(scratch):
            for _ in range(WARMUP_PASSES):
                outputs = self.run_layers(*inputs)
                self._backward(inputs, outputs, tuple(torch.ones_like(o) for o in outputs), scratch)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def _backward(self, inputs, outputs, output_grads, sums) -> torch.Tensor | None:
        """The layers' backward, weight gradients summed into `sums` (which .grad points at: the kernels add into
        it themselves and hand autograd None); the ones a kernel does hand back are added here. Returns x's
        gradient."""
        x = inputs[0]
        wanted = ((x,) if x.requires_grad else ()) + self.params
        grads = torch.autograd.grad(outputs, wanted, output_grads, allow_unused=True)
        input_grad, weight_grads = (grads[0], grads[1:]) if x.requires_grad else (None, grads)
        returned = [(s, g) for s, g in zip(sums, weight_grads) if g is not None]
        if returned:
            torch._foreach_add_([s for s, _ in returned], [g.to(s.dtype) for s, g in returned])
        return input_grad

    @contextmanager
    def _summing_into(self, sums):
        """.grad of every weight pointed at `sums` and in-place sums on, then .grad as it was."""
        saved = [p.grad for p in self.params]
        try:
            for p, s in zip(self.params, sums):
                p.grad = s
            with weight_grads_summed_in_place(True):
                yield
        finally:
            for p, grad in zip(self.params, saved):
                p.grad = grad

    # ---- the weights' gradients ----------------------------------------------------------------------------------
    def weight_grads_for_autograd(self) -> tuple[torch.Tensor | None, ...]:
        """None for every weight while the loop sums in place; else a copy of the sums (one buffer, viewed per
        weight, as the first micro-batch's q, k and v gradients are in the eager model), the sums cleared."""
        if summing_weight_grads_in_place():
            return (None,) * len(self.params)
        handed_over = self._shaped_as_weights(self.grad_sums_flat.clone())
        self.grad_sums_flat.zero_()
        return handed_over

    def _shaped_as_weights(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Views of one buffer, in parameter order, shaped as the weights: q, k and v's lie side by side, as the
        GEMM that sums them in place needs (kernels/concat_linear.py)."""
        return tuple(part.view_as(p) for part, p in zip(flat.split([p.numel() for p in self.params]), self.params))


@contextmanager
def _autocast_without_cache():
    """Autocast as it is, but without its cache of cast weights, which a capture cannot hold (torch's
    make_graphed_callables refuses it too): the graphs then cast the weights themselves at every replay."""
    if not torch.is_autocast_enabled("cuda") or not torch.is_autocast_cache_enabled():
        yield
        return
    with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False):
        yield


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graphs: LayerGraphs, captured: _Captured, x, cos, sin, *params):
        for mine, given in zip(captured.inputs, (x, cos, sin)):
            if mine.data_ptr() != given.data_ptr():
                mine.copy_(given)
        captured.forward.replay()
        ctx.graphs, ctx.captured = graphs, captured
        return tuple(o.detach() for o in captured.outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *output_grads):
        captured = ctx.captured
        for mine, given in zip(captured.output_grads, output_grads):  # never None: autograd fills in zeros
            if mine.data_ptr() != given.data_ptr():
                mine.copy_(given)
        captured.backward.replay()
        input_grad = None if captured.input_grad is None else captured.input_grad.detach()
        return None, None, input_grad, None, None, *ctx.graphs.weight_grads_for_autograd()
