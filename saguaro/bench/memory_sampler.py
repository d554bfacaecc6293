"""The machine's used memory, sampled on a thread: what `saguaro bench` and benchmarks/first_call.py
report beside every speed figure.

Used memory is MemTotal - MemAvailable, machine-wide: it counts a drafter worker process as well as
this one, and not the page cache that memory-mapped safetensors files sit in (a process's resident
size counts those pages, which the kernel can drop, and so overstates what a run needs). Anything
else running on the machine counts too, so the sampler also sums the anonymous and shared memory
of this process and its children (their proportional share, Pss_Anon + Pss_Shmem): the same
quantity, for this program alone.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def used_memory_bytes() -> int | None:
    """MemTotal - MemAvailable, or None where /proc/meminfo is missing (not Linux)."""
    try:
        fields = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            fields[key] = int(value.split()[0]) * 1024
        return fields["MemTotal"] - fields["MemAvailable"]
    except (OSError, KeyError, ValueError):
        return None


def _pss_bytes(pid: int) -> int:
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Pss_Anon:", "Pss_Shmem:")):
            total += int(line.split()[1]) * 1024
    return total


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except OSError:
        return []


def process_tree_bytes(pid: int | None = None) -> int | None:
    """Anonymous and shared memory of a process and its descendants (None where not readable)."""
    stack, total = [pid or os.getpid()], 0
    try:
        while stack:
            current = stack.pop()
            total += _pss_bytes(current)
            stack += _children(current)
    except (OSError, ValueError):
        return None if total == 0 else total
    return total


class MemorySampler:
    """Peak used memory over its value when the sampler started (`baseline`), every `interval` s;
    `mark()` starts a new window whose own peak `window_peak()` reports. Everything None where the
    machine gives no reading."""

    def __init__(self, interval: float = 0.02):
        self.baseline = used_memory_bytes()
        self.peak = self._window = self.baseline
        self.tree_baseline = process_tree_bytes()
        self.tree_peak = self.tree_baseline or 0
        self._stop = threading.Event()
        self._thread = None
        if self.baseline is not None:
            self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
            self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            used = used_memory_bytes() or 0
            self.peak, self._window = max(self.peak, used), max(self._window, used)
            self.tree_peak = max(self.tree_peak, process_tree_bytes() or 0)

    def mark(self) -> None:
        if self.baseline is not None:
            self._window = used_memory_bytes() or 0

    def window_peak(self) -> int | None:
        """The peak over the baseline since the last mark()."""
        return None if self.baseline is None else self._window - self.baseline

    def tree_peak_over_baseline(self) -> int | None:
        """This program's own peak (process tree) over its value when the sampler started."""
        return None if self.tree_baseline is None else self.tree_peak - self.tree_baseline

    def stop(self) -> int | None:
        """Stop sampling; the peak over the baseline."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return None if self.baseline is None else self.peak - self.baseline
