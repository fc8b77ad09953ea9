#!/usr/bin/env bash
# Issue 7: the Triton caption cross-attention on one GPU, in one call (same machine for every figure):
#   1. bench_cross_attention.py: SDPA backends vs the kernel (each block config and the autotuned one)
#      at the 600M / 1600M head shapes, 1024-4096 px -> $OUT/cross_attention_speed.json;
#   2. bench_sana.py transformer_step, regional compile + CUDA graphs, bf16 and fp8, with the kernel
#      (SANAFLOW_CROSS_ATTENTION=triton) and with SDPA (=torch) -> $OUT/step_{triton,torch}.json;
#   3. the GPU tests of the kernel and of the paths that run it (pytest -m gpu).
# Run from the repo root (diffusers importable): MODEL=600M PX=4096 OUT=/some/dir bash benchmarks/gpu_cross_attention.sh
# (MICRO_PX=2048,4096 narrows step 1, STEP_BACKENDS= skips step 2, TESTS=... picks the test files of step 3)
set -uo pipefail
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python3 || command -v python)}
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-600M}
PX=${PX:-4096}
IMPLS=${IMPLS:-ours-compile-regional-cudagraphs,ours-fp8-regional-cudagraphs}
mkdir -p "$OUT"
failed=0
step() {  # step LIMIT_S CMD...: run CMD under a time limit, report its exit status
    local limit=$1
    shift
    echo "== $(date +%T) [limit ${limit}s] $*"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "== $(date +%T) rc=$rc$([ "$rc" -eq 124 ] && echo ' (time limit)')"
    [ "$rc" -eq 0 ] || failed=1
}
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
step "${LIMIT_MICRO:-110}" "$PY" benchmarks/bench_cross_attention.py --px "${MICRO_PX:-1024,2048,4096}" --out "$OUT/cross_attention_speed.json"
for backend in ${STEP_BACKENDS-triton torch}; do  # STEP_BACKENDS= skips the step
    SANAFLOW_CROSS_ATTENTION=$backend \
        step "${LIMIT_STEP:-150}" "$PY" benchmarks/bench_sana.py --cases transformer_step --models "$MODEL" --px "$PX" \
        --impls "$IMPLS" --settle-s 3 --fresh --out "$OUT/step_$backend.json"
done
# shellcheck disable=SC2086  # TESTS is a list of paths
step "${LIMIT_TESTS:-130}" "$PY" -m pytest -q -m gpu ${TESTS:-tests/test_ops_cross_attention.py tests/test_cuda_graphs.py \
    tests/test_quant.py} -p no:cacheprovider
exit $failed
