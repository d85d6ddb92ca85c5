#!/usr/bin/env bash
# One device call: `dlmtrt bench` at the SDAR shapes (random bf16 weights, prompt 512, answer 256, blocks of 4
# with 4 steps: one token per step), the floor measured in each run. The issue-27 goals: sdar-8b B=1/8/32 and
# sdar-4b B=128. Usage (repo root, on the device):
#   OUT=dir bash bench/gpu_sdar.sh   [RUNS="sdar-8b:1:none,append sdar-8b:8 ..."] [COMPILE=1] [CHECK=1]
# A run is shape:batch[:policies]; policies default to append. CHECK=1 runs bench/gpu_graph_check.py first.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
[ -z "${CHECK:-}" ] || python3 bench/gpu_graph_check.py "$OUT/graph-check.json" 2>&1 | tail -n 20
extra=(); [ -z "${COMPILE:-}" ] || extra=(--compile)
for run in ${RUNS:-sdar-8b:1:none,append sdar-8b:8 sdar-8b:32 sdar-4b:128 sdar-1.7b:1:none,append}; do
  IFS=: read -r shape batch pols <<< "$run"
  args=(); IFS=, read -ra ps <<< "${pols:-append}"; for p in "${ps[@]}"; do args+=(--policy "$p"); done
  t0=$(date +%s)
  python3 cli.py bench --shape "$shape" --device cuda --backend torch-graph "${extra[@]}" --batch "$batch" \
    --prompt 512 --answer 256 --block-length 4 --steps 4 "${args[@]}" \
    --out "$OUT/bench-$shape-b$batch${COMPILE:+-compile}.json" 2>&1 | grep -v -E '^\s*$' | tail -n 8
  echo "$shape B=$batch: $(( $(date +%s) - t0 )) s"
done
