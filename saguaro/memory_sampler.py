"""The machine's used memory, sampled on a thread: what `saguaro bench` and benchmarks/first_call.py
report beside every speed figure.

Used memory is MemTotal - MemAvailable, machine-wide: it counts a drafter worker process as well as
this one, and not the page cache that memory-mapped safetensors files sit in (a process's resident
size counts those pages, which the kernel can drop, and so overstates what a run needs).
"""

from __future__ import annotations

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


class MemorySampler:
    """Peak used memory over its value when the sampler started (`baseline`), every `interval` s;
    `mark()` starts a new window whose own peak `window_peak()` reports. Everything None where the
    machine gives no reading."""

    def __init__(self, interval: float = 0.02):
        self.baseline = used_memory_bytes()
        self.peak = self._window = self.baseline
        self._stop = threading.Event()
        self._thread = None
        if self.baseline is not None:
            self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
            self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            used = used_memory_bytes() or 0
            self.peak, self._window = max(self.peak, used), max(self._window, used)

    def mark(self) -> None:
        if self.baseline is not None:
            self._window = used_memory_bytes() or 0

    def window_peak(self) -> int | None:
        """The peak over the baseline since the last mark()."""
        return None if self.baseline is None else self._window - self.baseline

    def stop(self) -> int | None:
        """Stop sampling; the peak over the baseline."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return None if self.baseline is None else self.peak - self.baseline
