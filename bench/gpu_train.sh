#!/usr/bin/env bash
# One device call per family: GPU smoke test of the foundation (optional), one task model trained with the
# whole GPU, then a GPU accuracy check at N=200. Usage (repo root, on the GPU machine):
#   OUT=dir FAMILY=dream MINUTES=8 SMOKE=1 bash bench/gpu_train.sh
set -euo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out/gpu}; MINUTES=${MINUTES:-8}; CK=${CK:-/tmp/ck}; FAMILY=${FAMILY:-dream}; SMOKE=${SMOKE:-0}
mkdir -p "$OUT" "$CK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [ "$SMOKE" = 1 ]; then
  python3 -m bench.gpu_smoke > "$OUT/gpu_smoke.json" 2> "$OUT/gpu_smoke.err" || cat "$OUT/gpu_smoke.err"
  cat "$OUT/gpu_smoke.json"
fi
python3 -m bench.train --family "$FAMILY" --out "$CK/tiny-$FAMILY-tasks" --minutes "$MINUTES" --workers 14 \
  2>&1 | tr '\r' '\n' | grep -v '^\s*$' | awk 'NR<=3 || /saved/ || NR%40==0' > "$OUT/train_$FAMILY.log"
tail -n 3 "$OUT/train_$FAMILY.log"
python3 cli.py eval -m "$CK/tiny-$FAMILY-tasks" --task sudoku4:clues=8-12 --task countdown:numbers=3 \
  --task countdown --task sort44 --n 200 --batch-size 200 --device cuda --out "$OUT/eval_gpu_$FAMILY.json" 2>&1 | tail -n 10
tar -C "$CK" -cf "$OUT/tiny-$FAMILY-tasks.tar" "tiny-$FAMILY-tasks"
