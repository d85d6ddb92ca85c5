# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
SHELL := bash
.SHELLFLAGS := -o pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup plugin fp8-sweep demo test clean

# The cached-attention kernel and its C-ABI launcher (plugins/cached_attention), for every datacenter and edge
# architecture we target (A100 sm_80, A10/A40 sm_86, Jetson Orin sm_87, L4/L40 sm_89, H100/H200 sm_90, B200
# sm_100, Jetson Thor sm_110, RTX 50 sm_120) plus PTX for newer ones; Hopper as sm_90a, whose wgmma the
# kernel's Hopper path needs (sm_90a code runs on every compute capability 9.0 GPU). Loaded by
# dlmtrt/plugins/launcher.py.
# tests/test_plugin_kernel.py reads the embedded architectures back (dlmtrt/plugins/fatbin.py).
NVCC ?= nvcc
PLUGIN_LIB := dlmtrt/plugins/lib/libdlmtrt_cached_attention.so
ARCHS := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_86,code=sm_86 \
	-gencode arch=compute_89,code=sm_89 -gencode arch=compute_90,code=sm_90 \
	-gencode arch=compute_120,code=sm_120 -gencode arch=compute_120,code=compute_120
ATTENTION_ARCHS := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_86,code=sm_86 \
	-gencode arch=compute_87,code=sm_87 -gencode arch=compute_89,code=sm_89 \
	-gencode arch=compute_90a,code=sm_90a -gencode arch=compute_100,code=sm_100 \
	-gencode arch=compute_110,code=sm_110 -gencode arch=compute_120,code=sm_120 \
	-gencode arch=compute_120,code=compute_120

$(PLUGIN_LIB): $(wildcard plugins/cached_attention/*.cu plugins/cached_attention/*.cuh)
	mkdir -p $(dir $@)
	$(NVCC) -O3 -std=c++17 --threads 0 -shared -Xcompiler -fPIC -cudart static $(ATTENTION_ARCHS) -o $@ plugins/cached_attention/cached_attention.cu

# The few-row fp8 linear (plugins/fp8_linear), loaded by dlmtrt/plugins/fp8_linear.py: today's architectures
# only (each more costs CI about 30 s of build; fp8 tensor cores are sm_89 and newer).
FP8_LIB := dlmtrt/plugins/lib/libdlmtrt_fp8_linear.so
$(FP8_LIB): plugins/fp8_linear/fp8_linear.cu
	mkdir -p $(dir $@)
	$(NVCC) -O3 -std=c++17 --threads 0 -shared -Xcompiler -fPIC -cudart static $(ARCHS) -o $@ $<

plugin: $(PLUGIN_LIB) $(FP8_LIB)

# Benchmark only: the fp8 kernel with an explicit-configuration entry for bench/fp8_kernel_sweep.py (Hopper).
FP8_SWEEP_LIB := dlmtrt/plugins/lib/libdlmtrt_fp8_linear_sweep.so
$(FP8_SWEEP_LIB): plugins/fp8_linear/fp8_linear.cu
	mkdir -p $(dir $@)
	$(NVCC) -O3 -std=c++17 --threads 0 -shared -Xcompiler -fPIC -cudart static -DDLMTRT_FP8_SWEEP \
		-gencode arch=compute_90,code=sm_90 -o $@ $<

fp8-sweep: $(FP8_SWEEP_LIB)

$(STAMP): requirements-ci.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-ci.txt 2>&1 \
		| { grep -v "is ignored: it is neither a file nor a directory" || true; }
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1 \
		| { grep -v "is ignored: it is neither a file nor a directory" || true; }
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	rm -rf out/demo
	$(BIN)/dlmtrt make-tiny --arch dream --out out/demo/dream
	$(BIN)/dlmtrt generate --model out/demo/dream --chat --prompt "What is 2+2?" --prompt "Name a colour." \
		--max-new-tokens 32 --steps 16
	$(BIN)/dlmtrt make-tiny --arch llada --out out/demo/llada
	$(BIN)/dlmtrt generate --model out/demo/llada --chat --prompt "What is 2+2?" \
		--max-new-tokens 32 --steps 16 --block-length 16
	$(BIN)/dlmtrt generate --model tiny-llada-tasks --prompt $$'sudoku\n0120\n4231\n2000\n0040\n' \
		--max-new-tokens 20 --steps 20 --block-length 20 --policy dual+parallel
	$(BIN)/dlmtrt export --model tiny-llada-tasks --out out/demo/llada-onnx
	$(BIN)/dlmtrt generate --model out/demo/llada-onnx --backend onnxruntime \
		--prompt $$'sudoku\n0120\n4231\n2000\n0040\n' --max-new-tokens 20 --steps 20 --block-length 20 --policy decode

test: setup plugin
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out $(dir $(PLUGIN_LIB))
