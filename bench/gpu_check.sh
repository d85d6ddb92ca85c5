#!/usr/bin/env bash
# One device call that re-checks what a change to the runtime or the kernel could break on a GPU: builds the two
# kernel libraries, runs the fast path's token-identity check (bench/gpu_graph_check.py), the CUDA tests
# (the attention kinds and the kernel through its launcher), and the kernel's accuracy and speed cases
# (bench/gpu_attention.py). Usage (repo root, on the device): OUT=dir bash bench/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
make plugin > "$OUT/plugin-build.log" 2>&1 || { tail -20 "$OUT/plugin-build.log"; exit 1; }
echo "kernel libraries built in $(( $(date +%s) - t0 )) s"
python3 bench/gpu_graph_check.py "$OUT/graph-check.json" 2>&1 | tail -n 12
python3 -m pytest -q -p no:cacheprovider tests/test_attention_kinds.py tests/test_plugin_kernel.py 2>&1 | tail -n 6
python3 bench/gpu_attention.py "$OUT/attention.json" 2>&1 | tail -n 16
