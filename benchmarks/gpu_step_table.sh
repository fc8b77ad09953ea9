#!/usr/bin/env bash
# Issue 7's transformer-step table for one model size in one process (same run, same GPU), and where
# the 4096 px step's time goes in bf16 and in fp8:
#   1. profiles of our regional-compiled step at 4096 px, bf16 and fp8 -> $OUT/profile_<model>_{bf16,fp8}.json
#      (the GEMM share bounds what fp8 can buy: its GEMMs get faster, the rest of the step does not);
#   2. bench_sana.py transformer_step at 1024 and 4096 px with the standard impls (diffusers,
#      diffusers-compile, ours, ours-compile, ours-fp8) -> $OUT/sana_step_<model>.json.
# Run from the repo root: MODEL=600M OUT=/some/dir bash benchmarks/gpu_step_table.sh (PYTHONPATH=src is
# prepended here; diffusers must be importable). Each step has its own time limit (560 s in all) and a
# failing step does not stop the next; the exit status is 1 if any step failed.
# SMOKE=1: a CPU check of the script (the benchmarks' --smoke / --tiny modes; ~1 min).
set -uo pipefail
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the GPU machine's python3 is the one with PyTorch
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-600M}
PX=${PX:-1024,4096}
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
if [ "${SMOKE:-0}" = 1 ]; then
    step 120 "$PY" benchmarks/profile_step.py --tiny --impl ours --compile --regional --json "$OUT/profile_tiny_bf16.json"
    step 120 "$PY" benchmarks/bench_sana.py --smoke --cases transformer_step --fresh --out "$OUT/sana_step_tiny.json"
else
    step 70 "$PY" benchmarks/profile_step.py --model "$MODEL" --px 4096 --impl ours --compile --regional \
        --json "$OUT/profile_${MODEL}_bf16.json"
    step 70 "$PY" benchmarks/profile_step.py --model "$MODEL" --px 4096 --impl ours --compile --regional \
        --quantize fp8 --json "$OUT/profile_${MODEL}_fp8.json"
    step 420 "$PY" benchmarks/bench_sana.py --cases transformer_step --models "$MODEL" --px "$PX" \
        --fresh --out "$OUT/sana_step_${MODEL}.json"
fi
exit $failed
