#!/usr/bin/env bash
# Install check (CI, after `make test`): build a wheel, install it into a fresh venv with the pinned CPU torch,
# and use the tool from outside the source tree; then the same with an editable install. Usage: bash .ci/install_check.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
TORCH=$(grep -E '^torch==' "$ROOT/requirements-ci.txt")

echo "== wheel"
quiet "$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$ROOT"
WHEEL=$(ls "$WORK"/dist/dlmtrt-*.whl)
unzip -l "$WHEEL" > "$WORK/wheel-files.txt"  # not piped into grep -q: its early exit is a SIGPIPE under pipefail
grep -q "dlmtrt/checkpoints/tiny-llada-tasks/model.safetensors" "$WORK/wheel-files.txt" \
  || { echo "the wheel lacks the shipped checkpoints"; exit 1; }

echo "== fresh venv: $TORCH, then the wheel (its own dependency ranges)"
"$PY" -m venv "$WORK/venv"
V="$WORK/venv/bin"
quiet "$V/python" -m pip install -q --disable-pip-version-check "$TORCH"
quiet "$V/python" -m pip install -q --disable-pip-version-check "$WHEEL"
"$V/python" -m pip check

use_it() {  # from a directory outside the source tree
  local where=$1
  mkdir -p "$where" && cd "$where"
  "$V/dlmtrt" --help > "$WORK/help.txt" && grep -q "make-tiny" "$WORK/help.txt"
  "$V/dlmtrt" make-tiny --arch llada --out tiny-llada
  "$V/dlmtrt" generate -m tiny-llada-tasks -p $'sudoku\n0120\n4231\n2000\n0040\n' -n 20 --steps 20 \
    --policy dual+parallel --json | "$V/python" -c "import json,sys; d=json.load(sys.stdin); assert d['answers'][0], d"
  "$V/dlmtrt" export -m tiny-llada -o tiny-llada-onnx
  "$V/dlmtrt" generate -m tiny-llada-onnx --backend onnxruntime -p hi -n 8 --steps 8 >/dev/null
  set +e
  "$V/dlmtrt" generate -m /nonexistent -p x > err.txt 2>&1
  local rc=$?
  set -e
  [ "$rc" = 1 ] || { echo "bad input exited $rc"; cat err.txt; exit 1; }
  grep -q "Traceback" err.txt && { cat err.txt; exit 1; }
  [ "$(grep -c . err.txt)" = 1 ] || { echo "expected a one-line error:"; cat err.txt; exit 1; }
  cat err.txt
  cd "$ROOT"
}

echo "== use it, installed from the wheel"
use_it "$WORK/run-wheel"
echo "== editable install"
quiet "$V/python" -m pip install -q --disable-pip-version-check --no-deps -e "$ROOT"
use_it "$WORK/run-editable"
echo "install check: passed"
