#!/usr/bin/env bash
# CPU accuracy of the shipped task checkpoints, the figures in their model cards: N=200 for sudoku4 and
# countdown; shift128 (129 denoising steps over a 280-row canvas) at N=${N_LONG:-200}, which takes about
# 25 minutes per model on a 2-core machine.
set -euo pipefail
N=${N:-200}; N_LONG=${N_LONG:-200}
for fam in ${FAMILIES:-dream llada}; do
  python cli.py eval -m "tiny-$fam-tasks" --task sudoku4 --task sudoku4:clues=8-12 --task countdown:numbers=3 \
    --task countdown --n "$N" --batch-size 100 --device cpu --out "bench/results/eval-tiny-$fam-tasks-cpu.json"
  python cli.py eval -m "tiny-$fam-tasks" --task shift128 --n "$N_LONG" --batch-size 100 --device cpu \
    --out "bench/results/eval-tiny-$fam-tasks-cpu-long.json"
done
