#!/usr/bin/env bash
# One device call: GPU smoke test of the foundation (optional), the task models of FAMILIES trained side by
# side on one GPU, saved as $OUT/NAME.tar as soon as training ends, then a GPU accuracy check
# at N=200 each. A family is dream or llada (masked diffusion) or
# sdar:BLOCK (block diffusion in SDAR's layout with blocks of BLOCK; NOISE=block for BD3-LM's per-block rates).
# Usage (repo root, on the GPU machine):
#   OUT=dir FAMILIES="dream llada" MINUTES=8 SMOKE=1 bash bench/gpu_train.sh
#   OUT=dir FAMILIES="sdar:4 sdar:16" MINUTES=8 bash bench/gpu_train.sh
set -euo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out/gpu}; MINUTES=${MINUTES:-8}; CK=${CK:-/tmp/ck}; FAMILIES=${FAMILIES:-dream llada}; SMOKE=${SMOKE:-0}
NOISE=${NOISE:-sequence}
mkdir -p "$OUT" "$CK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [ "$SMOKE" = 1 ]; then
  python3 -m bench.gpu_smoke > "$OUT/gpu_smoke.json" 2> "$OUT/gpu_smoke.err" || cat "$OUT/gpu_smoke.err"
  cat "$OUT/gpu_smoke.json"
fi
name() { IFS=: read -r f b <<< "$1"; echo "tiny-$f${b:+-b$b}-tasks"; }
for spec in $FAMILIES; do
  IFS=: read -r fam block <<< "$spec"
  extra=(); [ -z "$block" ] || extra=(--block-size "$block" --noise "$NOISE")
  python3 -m dlmtrt.evals.train --family "$fam" "${extra[@]}" --out "$CK/$(name "$spec")" --minutes "$MINUTES" \
    --workers $((14 / $(echo $FAMILIES | wc -w))) 2>&1 \
    | tr '\r' '\n' | grep -v '^\s*$' | awk 'NR<=3 || /saved/ || NR%40==0' > "$OUT/train_$(name "$spec").log" &
done
wait
tail -n 2 "$OUT"/train_*.log
for spec in $FAMILIES; do n=$(name "$spec"); tar -C "$CK" -cf "$OUT/$n.tar" "$n"; done
for spec in $FAMILIES; do
  n=$(name "$spec")
  python3 cli.py eval -m "$CK/$n" --task sudoku4:clues=8-12 --task countdown:numbers=3 --task shift128 --n 200 --batch-size 200 --device cuda --out "$OUT/eval_gpu_$n.json" 2>&1 | tail -n 8
done
