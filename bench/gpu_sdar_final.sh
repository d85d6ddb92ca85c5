#!/usr/bin/env bash
# One device call for issue 27's figures after the fused store and the host-predicted schedule: the SDAR part of
# the graph check (token identity on CUDA and read-backs per step), the benches at every goal shape without
# compile, then sdar-8b B=1 compiled while time remains. Progress goes to $OUT/log.txt as it happens.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
t0=$(date +%s)
FAMILIES=sdar python3 bench/gpu_graph_check.py "$OUT/graph-check-sdar.json" 2>&1 | grep -v -E 'Warning|warn' | tail -n 24
echo "graph check: $(( $(date +%s) - t0 )) s"
RUNS="sdar-8b:1:append,append:store=separate sdar-8b:8 sdar-8b:32 sdar-4b:128 sdar-1.7b:1" OUT=$OUT bash bench/gpu_sdar.sh
RUNS="sdar-8b:1" COMPILE=1 OUT=$OUT bash bench/gpu_sdar.sh
echo "total: $(( $(date +%s) - t0 )) s"
