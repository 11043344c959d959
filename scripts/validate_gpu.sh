#!/usr/bin/env bash
# GPU validation of the suite, one stage per call, logs under $OUT (default runs/validate):
#   bash scripts/validate_gpu.sh tests       the GPU tests (python3 -m pytest -m gpu)
#   bash scripts/validate_gpu.sh demo        the demo run with the default plugin (gemini); -p auto for the 1b shape
#   bash scripts/validate_gpu.sh plugins     1b shape, sample corpus: 50 steps (STEPS) per plugin, saved halfway
#                                            and resumed
#                                            (PLUGINS="zero2 gemini" picks some; default all but hybrid_parallel)
#   bash scripts/validate_gpu.sh bench       benchmark.py JSON lines: 1b at sequence 2048, zero2 and gemini, presets
#   bash scripts/validate_gpu.sh two_gpu     the plugins and bench stages for gemini and zero2 (or PLUGINS) on every
#                                            GPU present
# Extra arguments go to every pretrain.py/benchmark.py call. On the project's offline GPU hosts, source
# .whl/gpu-env.sh first (../shared/device/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: validate_gpu.sh tests|demo|plugins|bench|two_gpu [extra flags]}
shift
OUT=${OUT:-runs/validate}
PY=${PYTHON:-python3}
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
WORK=${WORK:-/tmp/suite-validate}
STEPS=${STEPS:-50}  # pretrain_and_resume: STEPS in all, stopped and saved halfway, then resumed
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

run() { # name, command...: run, keep the log, record the exit status
    local name=$1; shift
    echo "=== $name: $*"
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $(grep -E '^(done:|-p auto chose)' "$OUT/$name.log" | tail -1)" | tee -a "$OUT/summary.txt"
    grep -E '^\{' "$OUT/$name.log" >> "$OUT/bench.jsonl"
    [ $rc -eq 0 ] || tail -20 "$OUT/$name.log"
}

$PY -m corpus.sample --out data/sample
SAMPLE=(-d data/sample/corpus --tokenizer data/sample/tokenizer --data_cache "$WORK/prepared")

pretrain_and_resume() { # plugin, nproc
    local plugin=$1 nproc=$2 ckpt="$WORK/ckpt-$1-$2"
    shift 2
    rm -rf "$ckpt"
    local common=(pretrain.py -c 1b -p "$plugin" -l 2048 -b 4 --lr 3e-4 -s 5 --max_steps "$STEPS" "${SAMPLE[@]}"
                  -o "$ckpt" -t "$OUT/tb-$plugin-$nproc" --keep_last 1 --log_interval 5 "$@")
    run "pretrain-$plugin-${nproc}gpu-first" torchrun --standalone --nproc_per_node "$nproc" "${common[@]}" -i $((STEPS / 2)) --stop_after $((STEPS / 2))
    run "pretrain-$plugin-${nproc}gpu-resumed" torchrun --standalone --nproc_per_node "$nproc" "${common[@]}" -f latest
}

bench() { # name, nproc, flags...
    local name=$1 nproc=$2; shift 2
    run "bench-$name" torchrun --standalone --nproc_per_node "$nproc" benchmark.py -c 1b -l 2048 --max_steps 15 "$@"
}

case $stage in
tests)
    run gpu-tests $PY -m pytest -m gpu -q tests
    ;;
demo)
    run auto-1b torchrun --standalone --nproc_per_node 1 benchmark.py -c 1b -l 2048 -p auto --kernels auto --max_steps 10
    run demo-gemini $PY pretrain.py -c tiny "${SAMPLE[@]}" -b 8 -l 256 --lr 2e-3 --max_steps 200 --log_interval 10 \
        -o "$WORK/demo" -t "$OUT/tb-demo" "$@"
    ;;
plugins)
    for plugin in ${PLUGINS:-zero2 gemini gemini_auto zero2_cpu ddp}; do
        pretrain_and_resume "$plugin" 1 "$@"
    done
    [ -d "$WORK/ckpt-gemini-1" ] || exit 0
    run export-parity $PY -c "import sys; sys.path.insert(0, 'tests/training')
from entry_points import assert_export_gives_suite_logits
assert_export_gives_suite_logits('$WORK/ckpt-gemini-1', '$WORK/hf-gemini', seq_len=64)
print('done: the exported gemini checkpoint loads in transformers with the suite logits')"
    ;;
bench)
    for preset in ${PRESETS:-torch liger auto}; do
        for plugin in zero2 gemini; do
            bench "$plugin-$preset" 1 -p "$plugin" -b 8 --kernels "$preset" "$@"
        done
    done
    ;;
two_gpu)
    for plugin in ${PLUGINS:-zero2 gemini}; do
        pretrain_and_resume "$plugin" "$GPUS" "$@"
        bench "$plugin-auto-${GPUS}gpu" "$GPUS" -p "$plugin" -b 8 --kernels auto "$@"
    done
    ;;
*)
    echo "unknown stage $stage" >&2; exit 2 ;;
esac
cat "$OUT/summary.txt"
