#!/usr/bin/env bash
# One device call for issue 31's figures (about 7 minutes on an H200), after `make plugin`: the kernel's accuracy
# and its speed against SDPA and (block-causal) compiled flex_attention, all in one run (bench/gpu_attention.py
# --flex; ATTENTION=0 skips it, FLEX=0 leaves flex out), then the 7B step with each attention choice of the
# torch-graph backend (sdpa, kernel, auto), B=1 and B=8, policies none, decode and dual, through `dlmtrt bench`
# (random bf16 weights at Dream-7B shape; prompt 512, answer 256 in 64 steps). At most 8 files come back from
# the device: the step JSONs are 6, attention.json the 7th. Usage (repo root, on the device):
#   OUT=dir bash bench/gpu_attention_step.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
make plugin > "$OUT/plugin-build.log" 2>&1 || { tail -20 "$OUT/plugin-build.log"; exit 1; }
if [ "${ATTENTION:-1}" != 0 ]; then
  flex=(); [ "${FLEX:-1}" != 0 ] && flex=(--flex)
  timeout "${ATTENTION_SECONDS:-300}" python3 bench/gpu_attention.py "$OUT/attention.json" "${flex[@]}" 2>&1 \
    | grep -E "bidirectional  |block_causal:|within|worst|FAIL" | sed -e 's/  diff.*//' | tail -n 80
fi
for b in ${BATCHES:-1 8}; do
  for att in ${ATTENTIONS:-sdpa kernel auto}; do
    python3 cli.py bench --shape "${SHAPE:-dream-7b}" --device cuda --backend torch-graph --attention "$att" \
      --batch "$b" --prompt 512 --answer 256 --steps "${STEPS:-64}" --policy none --policy decode --policy dual \
      --out "$OUT/step-${SHAPE:-dream-7b}-$att-b$b.json" 2>&1 | grep -E "^│|policy|floor" | tail -n 6
  done
done
