#!/usr/bin/env bash
# One device call: the fast path's correctness check on the tiny checkpoints, then `dlmtrt bench` at Dream-7B
# shape (random bf16 weights) for the eager and the graph backend, B=1 and B=8. Usage (repo root):
#   OUT=dir bash bench/gpu_fastpath.sh        [BATCHES="1 8"] [CONFIGS="torch-graph:compile torch-graph torch"]
#     [POLICIES="none decode dual"] [SKIP_CHECK=1] [PROFILE=1: bench/profile_step.py afterwards]
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
[ -n "${SKIP_CHECK:-}" ] || PYTHONPATH=. python3 bench/gpu_graph_check.py "$OUT/graph_check.json" 2>&1 | tail -n 45
# configurations: backend[:compile]
for b in ${BATCHES:-1 8}; do
  for cfg in ${CONFIGS:-torch-graph:compile torch-graph torch}; do
    be=${cfg%%:*}; extra=(); [ "$cfg" != "${cfg%:compile}" ] && extra=(--compile)
    args=(); for p in ${POLICIES:-none decode dual}; do args+=(--policy "$p"); done
    python3 cli.py bench --shape ${SHAPE:-dream-7b} --device cuda --backend "$be" "${extra[@]}" --batch "$b" \
      --prompt 512 --answer 256 "${args[@]}" --out "$OUT/bench-${SHAPE:-dream-7b}-${cfg/:/-}-b$b.json" 2>&1 \
      | grep -v -E '^\s*$' | tail -n 9
  done
done
[ -z "${PROFILE:-}" ] || PYTHONPATH=. python3 bench/profile_step.py "$OUT/profile-dream-7b.json" 2>&1 \
  | grep -v -E 'USDT|^\s*$|Warning|warn' | tail -n 60
