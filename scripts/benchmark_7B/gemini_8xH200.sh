#!/usr/bin/env bash
# 7B, sequence 4096, Gemini on eight H200 141GB.
# Extra flags pass through, e.g. --max_steps 50 or -b 4. Set HOSTFILE=hostfiles/<file> to span several nodes.
cd "$(dirname "$0")/../.." || exit 1
exec colossalai run --nproc_per_node 8 ${HOSTFILE:+--hostfile "$HOSTFILE"} benchmark.py -c 7b -l 4096 -x bf16 --kernels auto -p gemini -b 4 "$@"
