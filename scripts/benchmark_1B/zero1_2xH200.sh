#!/usr/bin/env bash
# 1B, sequence 2048, ZeRO-1 on two H200 141GB: full gradients on each GPU, summed in place over the step's 16
# micro-batches and reduced once per step, where zero2 reduce-scatters after every micro-batch. The fastest 1b
# layout on two H200s (docs/performance.md): 79.7k tokens/s/GPU (62.2% MFU) against zero2's 76.8k, for 1 GiB more per GPU.
# Extra flags pass through, e.g. --max_steps 50 or -b 8.
# Set HOSTFILE=hostfiles/<file> to span several nodes.
cd "$(dirname "$0")/../.." || exit 1
exec colossalai run --nproc_per_node 2 ${HOSTFILE:+--hostfile "$HOSTFILE"} benchmark.py -c 1b -l 2048 -x bf16 --kernels auto -p zero1 -b 16 --global_batch_tokens 1048576 "$@"
