#!/usr/bin/env bash
# One device call: the quality-vs-work table of every decode policy on both shipped task checkpoints, fp32 on
# the GPU (accuracy, NFE, rows, and the wall time / tokens/s that the CPU cannot give). Usage (repo root):
#   OUT=dir N=200 bash bench/gpu_policies.sh
set -euo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out/gpu}; N=${N:-200}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m bench.policy_table --device cuda --n "$N" --batch-size "$N" --out-dir "$OUT" ${MODELS:-} 2>&1 \
  | tr '\r' '\n' | grep -v -E '^\s*$|━' | tee "$OUT/policies.log" | tail -n 150
