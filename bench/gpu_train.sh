#!/usr/bin/env bash
# One device call: GPU smoke test of the foundation (optional), the task models of FAMILIES trained side by
# side on one GPU, then a GPU accuracy check at N=200 each. Usage (repo root, on the GPU machine):
#   OUT=dir FAMILIES="dream llada" MINUTES=8 SMOKE=1 bash bench/gpu_train.sh
set -euo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out/gpu}; MINUTES=${MINUTES:-8}; CK=${CK:-/tmp/ck}; FAMILIES=${FAMILIES:-dream llada}; SMOKE=${SMOKE:-0}
mkdir -p "$OUT" "$CK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [ "$SMOKE" = 1 ]; then
  python3 -m bench.gpu_smoke > "$OUT/gpu_smoke.json" 2> "$OUT/gpu_smoke.err" || cat "$OUT/gpu_smoke.err"
  cat "$OUT/gpu_smoke.json"
fi
for fam in $FAMILIES; do
  python3 -m dlmtrt.evals.train --family "$fam" --out "$CK/tiny-$fam-tasks" --minutes "$MINUTES" --workers $((14 / $(echo $FAMILIES | wc -w))) 2>&1 \
    | tr '\r' '\n' | grep -v '^\s*$' | awk 'NR<=3 || /saved/ || NR%40==0' > "$OUT/train_$fam.log" &
done
wait
tail -n 2 "$OUT"/train_*.log
for fam in $FAMILIES; do
  python3 cli.py eval -m "$CK/tiny-$fam-tasks" --task sudoku4:clues=8-12 --task countdown:numbers=3 --task shift128 --n 200 --batch-size 200 --device cuda --out "$OUT/eval_gpu_$fam.json" 2>&1 | tail -n 8
  tar -C "$CK" -cf "$OUT/tiny-$fam-tasks.tar" "tiny-$fam-tasks"
done
