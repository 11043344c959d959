"""Times every installed backend of each op at one model size's shapes: forward + backward, bf16, one CUDA GPU.

    python3 -m model.kernels.bench -c 1b -b 8 -l 2048

Each op alone, median of CUDA-event timings after warm-up, with the peak memory above the inputs; attention on plain
causal rows and on packed rows (--docs documents per row). This is what `auto` is chosen from; benchmark.py
measures whole training steps. FlexAttention is also checked for recompiling on fresh batches of documents.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from . import OP_TABLES, missing_packages
from .attention import document_ids
from .rotary import rotary_tables


def op_inputs(op: str, config, batch: int, seq: int, doc_ids):
    """(arguments, indices of the arguments that take gradients) for one op at the model's shapes."""
    device, dtype = "cuda", torch.bfloat16
    randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    d, head_dim = config.hidden_size, config.head_dim
    if op == "attention":
        q = randn(batch, seq, config.num_attention_heads, head_dim)
        k, v = (randn(batch, seq, config.num_key_value_heads, head_dim) for _ in range(2))
        return [q, k, v, doc_ids], [0, 1, 2]
    if op == "rms_norm":
        return [randn(batch, seq, d), torch.ones(d, device=device, dtype=dtype), config.rms_norm_eps], [0, 1]
    if op == "rotary":
        cos, sin = rotary_tables(torch.arange(seq, device=device).expand(batch, seq), head_dim, config.rope_theta)
        q = randn(batch, seq, config.num_attention_heads, head_dim)
        return [q, randn(batch, seq, config.num_key_value_heads, head_dim), cos, sin], [0, 1]
    if op == "qkv_rotary":
        cos, sin = rotary_tables(torch.arange(seq, device=device).expand(batch, seq), head_dim, config.rope_theta)
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        return [randn(batch, seq, (heads + 2 * kv_heads) * head_dim), cos, sin, heads, kv_heads], [0]
    if op == "add_rms_norm":
        return [randn(batch, seq, d), randn(batch, seq, d), torch.ones(d, device=device, dtype=dtype),
                config.rms_norm_eps], [0, 1, 2]
    if op == "swiglu":
        return [randn(batch, seq, config.intermediate_size), randn(batch, seq, config.intermediate_size)], [0, 1]
    if op == "swiglu_packed":
        return [randn(batch, seq, 2 * config.intermediate_size)], [0]
    if op == "loss":
        labels = torch.randint(0, config.vocab_size, (batch * seq,), device=device)
        return [randn(batch * seq, d), 0.02 * randn(config.vocab_size, d), labels], [0, 1]
    raise ValueError(op)


def time_fwd_bwd(fn, args, grad_indices, iters: int = 20, warmup: int = 3) -> tuple[float, float]:
    """Median milliseconds of forward + backward, and peak GiB allocated above the inputs."""
    leaves = [a.detach().requires_grad_(i in grad_indices) if torch.is_tensor(a) and a.is_floating_point() else a
              for i, a in enumerate(args)]
    times = []
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + iters):
        for leaf in leaves:
            if torch.is_tensor(leaf):
                leaf.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*leaves)
        sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**30


def packed_doc_ids(batch: int, seq: int, docs: int, seed: int) -> torch.Tensor:
    """(B, T) ids of `docs` documents per row with random boundaries."""
    generator = torch.Generator().manual_seed(seed)
    positions = torch.empty(batch, seq, dtype=torch.long)
    for row in range(batch):
        cuts = sorted(torch.randperm(seq - 1, generator=generator)[: docs - 1].add(1).tolist())
        bounds = [0, *cuts, seq]
        positions[row] = torch.cat([torch.arange(b - a) for a, b in zip(bounds[:-1], bounds[1:])])
    return document_ids(positions).cuda()


def flex_recompiles(batch: int, seq: int, config, docs: int, batches: int = 3) -> int:
    """Dynamo frames compiled while running flex on `batches` fresh document layouts (0: the compiled kernel is
    reused across batches, as it must be for training)."""
    from torch._dynamo.utils import counters

    fn = OP_TABLES["attention"]["flex"]
    args, grads = op_inputs("attention", config, batch, seq, packed_doc_ids(batch, seq, docs, seed=100))
    time_fwd_bwd(fn, args, grads, iters=1, warmup=0)
    before = counters["frames"]["ok"]
    for seed in range(batches):
        args[3] = packed_doc_ids(batch, seq, docs, seed=seed)
        time_fwd_bwd(fn, args, grads, iters=1, warmup=0)
    return counters["frames"]["ok"] - before


def main() -> None:
    from model.config import LlamaConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", default="1b", help="model size or HF config.json (default 1b)")
    parser.add_argument("-b", "--batch_size", type=int, default=8)
    parser.add_argument("-l", "--max_length", type=int, default=2048)
    parser.add_argument("--docs", type=int, default=4, help="documents per packed row (default 4)")
    parser.add_argument("--ops", nargs="+", default=list(OP_TABLES), choices=list(OP_TABLES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: model.kernels.bench times CUDA kernels; no CUDA device here")
    config = LlamaConfig.from_name(args.config)
    batch, seq = args.batch_size, args.max_length
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {config.name} shapes, batch {batch} x {seq}, "
          f"bf16, forward + backward")
    print(f"{'op':<10} {'backend':<18} {'rows':<9} {'ms':>8} {'peak GiB':>9}")
    doc_ids = packed_doc_ids(batch, seq, args.docs, seed=0)
    for op in args.ops:
        layouts = {"causal": None, "packed": doc_ids} if op == "attention" else {"": None}
        for name, fn in OP_TABLES[op].items():
            missing = missing_packages(op, name)
            for layout, ids in layouts.items():
                if missing:
                    print(f"{op:<10} {name:<18} {layout:<9} {'needs ' + ', '.join(missing):>18}")
                    continue
                inputs, grads = op_inputs(op, config, batch, seq, ids)
                try:
                    ms, gib = time_fwd_bwd(fn, inputs, grads)
                except torch.OutOfMemoryError:
                    print(f"{op:<10} {name:<18} {layout:<9} {'out of memory':>18}")
                    continue
                finally:
                    del inputs
                    torch.cuda.empty_cache()
                print(f"{op:<10} {name:<18} {layout:<9} {ms:8.3f} {gib:9.2f}", flush=True)
    if "attention" in args.ops:
        print(f"flex: {flex_recompiles(batch, seq, config, args.docs)} dynamo frames compiled over 3 fresh batches")


if __name__ == "__main__":
    main()
