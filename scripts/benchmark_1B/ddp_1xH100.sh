#!/usr/bin/env bash
# 1B, sequence 2048, plain PyTorch DDP on one H100 80GB (the baseline the ZeRO plugins beat).
# Extra flags pass through, e.g. --max_steps 50 or -b 4. Set HOSTFILE=hostfiles/<file> to span several nodes.
cd "$(dirname "$0")/../.." || exit 1
exec colossalai run --nproc_per_node 1 ${HOSTFILE:+--hostfile "$HOSTFILE"} benchmark.py -c 1b -l 2048 -x bf16 --kernels auto -p ddp -b 8 "$@"
