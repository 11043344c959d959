#!/usr/bin/env bash
# 70B, sequence 4096, Gemini on eight H200 141GB: recomputation, a quarter of the optimizer on the CPU
# (what `python plan.py -c 70b --gpus 8 --gpu_mem 141 -l 4096 --kernels auto` recommends: ~119 GiB per GPU and
# ~280 GiB of host memory; without offload the model states alone exceed 8 x 141 GiB).
# Extra flags pass through, e.g. --max_steps 20. Set HOSTFILE=hostfiles/<file> to span several nodes.
cd "$(dirname "$0")/../.." || exit 1
exec colossalai run --nproc_per_node 8 ${HOSTFILE:+--hostfile "$HOSTFILE"} benchmark.py -c 70b -l 4096 -x bf16 --kernels auto -p gemini -b 2 -g --offload_optim_frac 0.25 "$@"
