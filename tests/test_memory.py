"""evals/memory.py: the /proc/self/status reader, the high-water-mark reset and the per-stage RSS sampler that
bench/load_memory.py, bench/export_memory.py and `PeakMemory` share. Linux only (the CI machines are)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dlmtrt.evals import memory

MiB = 2 ** 20
linux = pytest.mark.skipif(not Path(memory.STATUS).exists(), reason="no /proc/self/status")


@linux
def test_proc_status_reads_the_memory_lines_in_bytes():
    s = memory.proc_status()
    assert set(memory.FIELDS) <= set(s)
    assert all(v % 1024 == 0 for v in s.values())
    assert 0 < s["VmRSS"] <= s["VmHWM"]
    assert memory.vm_hwm() >= s["VmRSS"]


def test_without_proc_nothing_is_made_up(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "STATUS", str(tmp_path / "missing"))
    assert memory.proc_status() == {}
    assert memory.vm_hwm() is None
    from dlmtrt.evals.speed import PeakMemory
    assert PeakMemory("cpu").peak() is None


@linux
def test_reset_hwm_brings_the_peak_down_to_the_current_size():
    block = b"\x01" * (64 * MiB)  # resident: every page written
    del block
    if not memory.reset_hwm():
        pytest.skip("/proc/self/clear_refs is not writable here")
    s = memory.proc_status()
    assert s["VmHWM"] - s["VmRSS"] < 32 * MiB


@linux
def test_sampler_attributes_an_allocation_to_its_stage():
    before = memory.proc_status()["VmRSS"]
    sampler = memory.RssSampler(period_s=0.001)
    sampler.start()
    sampler.set_stage("alloc")
    block = b"\x01" * (64 * MiB)
    sampler.set_stage("free")  # samples once more: the block is still held
    del block
    stages = sampler.finish()
    assert not sampler.is_alive()
    assert list(stages) == ["open", "alloc", "free"]
    for st in stages.values():
        assert {"hwm_before", "hwm_after", "max_rss", "anon_at_max", "file_at_max", "max_file", "seconds",
                "peak"} == set(st)
        assert st["peak"] in (st["hwm_after"], st["max_rss"]) and st["seconds"] >= 0
    alloc = stages["alloc"]
    assert alloc["max_rss"] >= before + 60 * MiB
    assert alloc["peak"] >= alloc["max_rss"]
    assert alloc["anon_at_max"] >= 60 * MiB


@linux
def test_one_stage_run():
    sampler = memory.RssSampler(period_s=0.001, stage="load")
    sampler.start()
    stages = sampler.finish()
    assert list(stages) == ["load"] and stages["load"]["max_rss"] > 0


def test_importing_it_does_not_import_torch():
    """The memory benchmarks read the bare interpreter's size before `import torch`, and their parents never
    import torch."""
    code = "import sys, dlmtrt.evals.memory; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


@linux
def test_peak_memory_is_not_hidden_by_an_earlier_peak():
    """PeakMemory counts from what the process holds, so a larger peak before it (another test, a freed
    model) does not swallow the run's figure."""
    from dlmtrt.evals.speed import PeakMemory
    earlier = b"\x01" * (256 * MiB)
    del earlier
    mem = PeakMemory("cpu")
    mem.reset()
    if mem.baseline is None:
        pytest.skip("/proc/self/clear_refs is not writable here")
    block = b"\x01" * (64 * MiB)
    assert mem.peak() >= 60 * MiB
    del block
