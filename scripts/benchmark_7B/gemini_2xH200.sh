#!/usr/bin/env bash
# 7B, sequence 4096, Gemini on two H200 141GB.
# Extra flags pass through, e.g. --max_steps 50 or -b 4. The global batch (--global_batch_tokens) sets the
# gradient accumulation that spreads the optimizer step over micro-batches, as in the README's fastest runs.
# On several GPUs Gemini gathers the next 4 parameter chunks while the current layers compute (--gemini_prefetch N
# changes it; 0 gave 53.3% MFU here against 55.1%).
# Set HOSTFILE=hostfiles/<file> to span several nodes.
cd "$(dirname "$0")/../.." || exit 1
exec colossalai run --nproc_per_node 2 ${HOSTFILE:+--hostfile "$HOSTFILE"} benchmark.py -c 7b -l 4096 -x bf16 --kernels auto -p gemini -b 2 --global_batch_tokens 65536 "$@"
