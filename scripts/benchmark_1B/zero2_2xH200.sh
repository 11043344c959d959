#!/usr/bin/env bash
# 1B, sequence 2048, ZeRO-2 on two H200 141GB, micro batch 32: the H200's memory holds it, and each
# micro-batch's gradient reduce-scatter then serves twice the tokens. With
# FlashAttention-4 (docs/performance.md): 78.1k tokens/s/GPU (60.9% MFU) at 94.1 GiB against 77.8k (60.6%) at micro batch 16.
# Extra flags pass through, e.g. --max_steps 50 or -b 4. The global batch (--global_batch_tokens) sets the
# gradient accumulation that spreads the optimizer step over micro-batches, as in the README's fastest runs.
# Set HOSTFILE=hostfiles/<file> to span several nodes.
cd "$(dirname "$0")/../.." || exit 1
exec colossalai run --nproc_per_node 2 ${HOSTFILE:+--hostfile "$HOSTFILE"} benchmark.py -c 1b -l 2048 -x bf16 --kernels auto -p zero2 -b 32 --global_batch_tokens 1048576 "$@"
