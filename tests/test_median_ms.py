"""evals.speed.median_ms, the one timer of `dlmtrt bench` and the GPU bench scripts: wall time on the CPU,
CUDA events on a GPU, and (`graph=True`, bench/fp8_kernel_sweep.py, bench/gpu_quant.py) replays of one
captured CUDA graph. The GPU cases run where a GPU is (the device machine); no timing bounds beyond sanity."""
from __future__ import annotations

import time

import pytest
import torch

from dlmtrt.evals.speed import median_ms

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cpu_wall_time_after_warmup():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    ms = median_ms(fn, "cpu", repeats=5, warmup=2)
    assert len(calls) == 7
    assert 2.0 <= ms < 200


def test_graph_needs_cuda():
    with pytest.raises(ValueError, match="CUDA graph"):
        median_ms(lambda: None, "cpu", graph=True)


@cuda
def test_cuda_events_time_the_queued_work():
    x = torch.randn(1024, 1024, device="cuda")
    calls = []

    def fn():
        calls.append(1)
        x @ x

    assert median_ms(fn, "cuda", repeats=4, warmup=1) > 0 and len(calls) == 5


@cuda
def test_graph_replays_one_capture():
    x = torch.randn(1024, 1024, device="cuda")
    y = torch.empty_like(x)
    calls = []

    def fn():
        calls.append(1)
        torch.matmul(x, x, out=y)

    ms = median_ms(fn, "cuda", repeats=10, warmup=2, graph=True)
    assert ms > 0 and len(calls) == 2  # one eager call, one captured; the replays run no Python
    assert torch.allclose(y, x @ x)
