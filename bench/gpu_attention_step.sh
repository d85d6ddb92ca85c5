#!/usr/bin/env bash
# One device call: the 7B step with each attention choice of the torch-graph backend (sdpa, kernel, auto), B=1
# and B=8, policies none, decode and dual, through `dlmtrt bench` (random bf16 weights at Dream-7B shape; prompt
# 512, answer 256 in 64 steps), after `make plugin`. Optionally (FLEX=1) the block-causal attention shapes
# against compiled flex_attention first. Usage (repo root, on the device): OUT=dir bash bench/gpu_attention_step.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
make plugin > "$OUT/plugin-build.log" 2>&1 || { tail -20 "$OUT/plugin-build.log"; exit 1; }
if [ -n "${FLEX:-}" ]; then
  timeout "${FLEX_SECONDS:-240}" python3 bench/gpu_attention.py "$OUT/attention-flex.json" --flex --skip accuracy \
    --kinds block_causal 2>&1 | grep -E "block_causal|within" | tail -n 40
fi
for b in ${BATCHES:-1 8}; do
  for att in ${ATTENTIONS:-sdpa kernel auto}; do
    python3 cli.py bench --shape "${SHAPE:-dream-7b}" --device cuda --backend torch-graph --attention "$att" \
      --batch "$b" --prompt 512 --answer 256 --steps "${STEPS:-64}" --policy none --policy decode --policy dual \
      --out "$OUT/step-${SHAPE:-dream-7b}-$att-b$b.json" 2>&1 | grep -E "^│|policy|floor" | tail -n 6
  done
done
