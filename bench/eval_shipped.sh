#!/usr/bin/env bash
# CPU accuracy of the shipped task checkpoints at N=200, the figures in their model cards.
set -euo pipefail
N=${N:-200}
for fam in ${FAMILIES:-dream llada}; do
  python cli.py eval -m "tiny-$fam-tasks" --task sudoku4 --task sudoku4:clues=8-12 --task countdown:numbers=3 \
    --task countdown --task shift128 --n "$N" --batch-size 100 --device cpu --out "bench/results/eval-tiny-$fam-tasks-cpu.json"
done
