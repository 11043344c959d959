#!/usr/bin/env bash
# 70B, sequence 4096, tensor parallel 8 x ZeRO-1 over two nodes of eight H200 141GB (HOSTFILE required).
# On one node of eight, tensor and pipeline layouts cannot hold the model states (plan.py: ~170 GiB per GPU even
# with recomputation); ZeRO-1 over the second node's replica halves the optimizer (~102 GiB per GPU).
# Extra flags pass through, e.g. --max_steps 20.
cd "$(dirname "$0")/../.." || exit 1
exec colossalai run --nproc_per_node 8 --hostfile "${HOSTFILE:?set HOSTFILE=hostfiles/two_nodes.txt}" benchmark.py -c 70b -l 4096 -x bf16 --kernels auto -p hybrid_parallel --tp 8 --zero 1 -b 1 "$@"
