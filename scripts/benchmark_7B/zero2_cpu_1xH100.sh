#!/usr/bin/env bash
# 7B, sequence 4096, on one H100 80GB: ZeRO with the fp32 weights and Adam's state in CPU memory (about 103 GiB of
# host memory). The CPU optimizer step takes about 24 s for 6.7B parameters, so a step of 128 sequences (micro batch
# 2 x 64 accumulated) spreads it over enough tokens; no recomputation: micro batch 2 peaks at 58 GiB.
# Extra flags pass through, e.g. --max_steps 50. Set HOSTFILE=hostfiles/<file> to span several nodes.
cd "$(dirname "$0")/../.." || exit 1
exec colossalai run --nproc_per_node 1 ${HOSTFILE:+--hostfile "$HOSTFILE"} benchmark.py -c 7b -l 4096 -x bf16 --kernels auto -p zero2_cpu -b 2 --global_batch_tokens 524288 "$@"
