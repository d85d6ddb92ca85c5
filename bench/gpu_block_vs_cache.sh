#!/usr/bin/env bash
# One device call for issue 28: the N=200 comparison of bench/block_vs_cache.py (fp32, its cells' accuracy and
# work) for the block models in BLOCK_MODELS, then the step rates of its cells' schedules at 8B shape
# (random bf16 weights, torch-graph without compile, B=1, prompt 512, answer 256, the floor measured in each
# run). LLaDA-8B in LLaDA's 2 blocks, one token per step, under none, decode, dual and dual+parallel; SDAR-8B
# under its exact cache (append) in blocks of 4 and 16 with one token per step and with half the steps.
# Usage (repo root, on the device):
#   OUT=dir BLOCK_MODELS="ck/tiny-sdar-b4-tasks ck/tiny-sdar-b16-tasks" bash bench/gpu_block_vs_cache.sh
#   [RUNS="llada sdar:4:4 ..."] (BLOCK_MODELS empty: the step rates only)
# A run is llada, or sdar:BLOCK:STEPS. Progress goes to $OUT/log.txt as it happens.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -n "${BLOCK_MODELS:-}" ]; then
  t0=$(date +%s); models=(); for m in $BLOCK_MODELS; do models+=(--block-model "$m"); done
  python3 -m bench.block_vs_cache "${models[@]}" --n 200 --device cuda --out "$OUT/block-vs-cache-h200.json" 2>&1 \
    | grep -v -E '^\s*$' | tail -n 60
  echo "comparison: $(( $(date +%s) - t0 )) s"
fi
common=(--device cuda --backend torch-graph --batch 1 --prompt 512 --answer 256)
for run in ${RUNS:-llada sdar:4:4 sdar:4:2 sdar:16:16 sdar:16:8}; do
  t0=$(date +%s)
  if [ "$run" = llada ]; then
    python3 cli.py bench --shape llada-8b "${common[@]}" --block-length 128 --policy none --policy decode \
      --policy dual --policy dual+parallel --out "$OUT/bench-llada-8b-2blocks.json" 2>&1 | grep -v -E '^\s*$' | tail -n 9
  else
    IFS=: read -r _ block steps <<< "$run"
    python3 cli.py bench --shape sdar-8b "${common[@]}" --block-length "$block" --steps "$steps" --policy append \
      --out "$OUT/bench-sdar-8b-b$block-s$steps.json" 2>&1 | grep -v -E '^\s*$' | tail -n 6
  fi
  echo "$run: $(( $(date +%s) - t0 )) s"
done
