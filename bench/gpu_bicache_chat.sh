#!/usr/bin/env bash
# One device call (issue 29's accuracy goal on the chat workload): fine-tune the shipped tiny-llada-tasks on chat
# prompts (train.py --init --chats), profile its BiCache depth table on the GPU, then measure BiCache against no
# reuse and the all-layer freeze on the chat workload (N=200). Results and the model (a tar) go to $OUT.
# Usage (repo root, on the GPU machine): OUT=dir MINUTES=2.5 bash bench/gpu_bicache_chat.sh
set -euo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out/gpu}; MINUTES=${MINUTES:-2.5}; CK=${CK:-/tmp/ck}; CHATS=${CHATS:-0.5}; LR=${LR:-1e-3}; N=${N:-200}
NAME=tiny-llada-chat-tasks
mkdir -p "$OUT" "$CK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"
python3 -m dlmtrt.evals.train --family llada --init dlmtrt/checkpoints/tiny-llada-tasks --chats "$CHATS" --lr "$LR" \
  --minutes "$MINUTES" --workers 14 --out "$CK/$NAME" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' \
  | awk 'NR<=3 || /saved|failed/ || NR%40==0' > "$OUT/train_$NAME.log"
tail -n 2 "$OUT/train_$NAME.log"
python3 cli.py bicache-profile -m "$CK/$NAME" --device cuda 2>&1 | tail -n 12
tar -C "$CK" -cf "$OUT/$NAME.tar" "$NAME"
timeout 330 python3 -m bench.bicache_accuracy --model "$CK/$NAME" --device cuda --n "$N" --workload chat \
  --out "$OUT/bicache-accuracy-chat-h200.json" 2>&1 | tail -n 30
