#!/usr/bin/env bash
# 1B, sequence 2048, Gemini on two H200 141GB.
# Extra flags pass through, e.g. --max_steps 50 or -b 4. Set HOSTFILE=hostfiles/<file> to span several nodes.
cd "$(dirname "$0")/../.." || exit 1
exec colossalai run --nproc_per_node 2 ${HOSTFILE:+--hostfile "$HOSTFILE"} benchmark.py -c 1b -l 2048 -x bf16 --kernels auto -p gemini -b 16 "$@"
