#!/usr/bin/env bash
# 1B (TinyLlama shape), sequence 2048, ZeRO-2 on one H100 80GB.
# Extra flags pass through, e.g. --max_steps 50 or -b 4. The global batch (--global_batch_tokens) sets the
# gradient accumulation that spreads the optimizer step over micro-batches, as in the README's fastest runs.
# Set HOSTFILE=hostfiles/<file> to span several nodes.
cd "$(dirname "$0")/../.." || exit 1
exec colossalai run --nproc_per_node 1 ${HOSTFILE:+--hostfile "$HOSTFILE"} benchmark.py -c 1b -l 2048 -x bf16 --kernels auto -p zero2 -b 16 --global_batch_tokens 524288 "$@"
