#!/usr/bin/env bash
# One device call: GPU smoke test of the foundation, both task models trained side by side on one GPU,
# then a quick GPU accuracy check. Usage (repo root, on the GPU machine): OUT=dir MINUTES=7 bash bench/gpu_train.sh
set -euo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out/gpu}; MINUTES=${MINUTES:-7}; CK=${CK:-/tmp/ck}
mkdir -p "$OUT" "$CK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m bench.gpu_smoke > "$OUT/gpu_smoke.json" 2> "$OUT/gpu_smoke.err" || cat "$OUT/gpu_smoke.err"
cat "$OUT/gpu_smoke.json"
for fam in dream llada; do
  python3 -m bench.train --family $fam --out "$CK/tiny-$fam-tasks" --minutes "$MINUTES" --workers 7 \
    > "$OUT/train_$fam.log" 2>&1 &
done
wait
tail -n 3 "$OUT"/train_*.log
for fam in dream llada; do
  python3 cli.py eval -m "$CK/tiny-$fam-tasks" --task sudoku4 --task sudoku4:clues=8-12 --task countdown:numbers=3 \
    --task countdown --task sort64 --n 200 --batch-size 200 --device cuda --out "$OUT/eval_gpu_$fam.json" 2>&1 | tail -n 12
  tar -C "$CK" -cf "$OUT/tiny-$fam-tasks.tar" "tiny-$fam-tasks"
done
