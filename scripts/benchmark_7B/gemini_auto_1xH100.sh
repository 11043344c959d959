#!/usr/bin/env bash
# 7B, sequence 4096, on one H100 80GB: Gemini places what does not fit on the CPU. It needs more host memory than
# zero2_cpu: on a host with 125 GiB, micro batch 2 with 4 accumulated was killed for host memory (pinned chunks).
# Extra flags pass through, e.g. --max_steps 50 or -b 4. Set HOSTFILE=hostfiles/<file> to span several nodes.
cd "$(dirname "$0")/../.." || exit 1
exec colossalai run --nproc_per_node 1 ${HOSTFILE:+--hostfile "$HOSTFILE"} benchmark.py -c 7b -l 4096 -x bf16 --kernels auto -p gemini_auto -b 1 -g "$@"
