"""Resident memory of this process, read from Linux /proc: the memory lines of /proc/self/status, the
high-water mark and its reset, and a thread that samples them per stage of a run (bench/load_memory.py,
bench/export_memory.py, `PeakMemory` in evals/speed.py).

Torch-free on purpose: the memory benchmarks read the size of a bare interpreter before `import torch`, and
their parent processes must not import torch at all (it would inflate their children's ru_maxrss).
"""
from __future__ import annotations

import threading
import time

STATUS = "/proc/self/status"
FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def proc_status() -> dict[str, int]:
    """The memory lines of /proc/self/status (FIELDS: resident size, its high-water mark, and the resident
    anonymous, file-backed and shared pages), in bytes; {} where they cannot be read (no Linux /proc)."""
    out = {}
    try:
        with open(STATUS) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in FIELDS:
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        return {}
    return out


def vm_hwm() -> int | None:
    """This process's peak resident memory in bytes (VmHWM, = ru_maxrss of a fresh process), or None where it
    cannot be read."""
    return proc_status().get("VmHWM")


def reset_hwm() -> bool:
    """Reset the peak resident memory to the current one (Linux: /proc/self/clear_refs, value 5); False where
    that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class RssSampler(threading.Thread):
    """Polls `proc_status` every `period_s` and keeps, per stage of the run, the largest sampled VmRSS with
    its anonymous/file split at that sample (`max_rss`, `anon_at_max`, `file_at_max`), the largest RssFile
    (`max_file`), VmHWM when the stage began and ended (`hwm_before`, `hwm_after`) and its `seconds`.

    VmHWM stays the authoritative peak (a poll can miss a short spike): `finish()` gives each stage a `peak`,
    its VmHWM at the end where the high-water mark rose during the stage (then exact), else its largest
    sample. `set_stage(name)` starts the next stage (a name seen before continues that stage, its seconds
    counted from its first start); a run with one stage reads `finish()[stage]`. Byte counts throughout.
    Needs /proc/self/status."""

    def __init__(self, period_s: float = 0.01, stage: str = "open"):
        super().__init__(daemon=True)
        self.period_s, self.stop_flag, self.lock = period_s, threading.Event(), threading.Lock()
        self.stage, self.stages = stage, {}
        self._enter(stage, proc_status())

    def _enter(self, stage: str, s: dict) -> None:
        self.stage = stage
        self.stages.setdefault(stage, {"hwm_before": s["VmHWM"], "max_rss": 0, "anon_at_max": 0, "file_at_max": 0,
                                       "max_file": 0, "t_start": time.perf_counter()})

    def set_stage(self, stage: str) -> None:
        with self.lock:
            s = proc_status()
            self._record(s)
            self.stages[self.stage]["hwm_after"] = s["VmHWM"]
            self.stages[self.stage]["seconds"] = time.perf_counter() - self.stages[self.stage]["t_start"]
            self._enter(stage, s)

    def _record(self, s: dict) -> None:
        st = self.stages[self.stage]
        st["max_file"] = max(st["max_file"], s.get("RssFile", 0))
        if s["VmRSS"] > st["max_rss"]:
            st.update(max_rss=s["VmRSS"], anon_at_max=s.get("RssAnon", 0), file_at_max=s.get("RssFile", 0))

    def run(self) -> None:
        while not self.stop_flag.is_set():
            with self.lock:
                self._record(proc_status())
            time.sleep(self.period_s)

    def finish(self) -> dict[str, dict]:
        """Stop sampling (after one last sample) and return {stage: figures} in the order the stages began."""
        self.set_stage("done")
        self.stop_flag.set()
        if self.is_alive():
            self.join()
        out = {}
        for name, st in self.stages.items():
            if name == "done":
                continue
            st.pop("t_start")
            rose = st["hwm_after"] > st["hwm_before"]
            st["peak"] = st["hwm_after"] if rose else st["max_rss"]  # exact where the high-water mark rose
            out[name] = st
        return out
