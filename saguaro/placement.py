"""Who computes where: the target's and the Saguaro drafter's share of the CPU.

On a CPU the drafter worker and the target compete for the same cores. Oversubscribing them
(both at all threads, as a forked worker inherits) makes both slow, so while the drafter works
beside the target the target runs on the cores the drafter does not use; while the drafter idles
(prefill, rounds with speculation off) the target takes every core again. The caller's own
torch thread setting is restored when the call ends.
"""

from __future__ import annotations

import os

import torch


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def drafter_threads_for(cores: int) -> int:
    """Threads for a drafter working beside the target on `cores` cores.

    A draft model is 3-10x smaller than its target, and a small model's forward gains little
    from more threads, so it gets about a quarter of the cores and the target keeps the rest; on
    2-3 cores that is one core each side.
    """
    return max(1, cores // 4) if cores >= 4 else 1


class ThreadSplit:
    """Switches the target's torch threads between 'alone' (all) and 'beside the drafter'."""

    def __init__(self, total: int, drafter: int):
        self.total, self.drafter = total, drafter
        self._saved: int | None = None

    @classmethod
    def for_cpu(cls, cores: int | None = None) -> ThreadSplit:
        cores = cores or available_cores()
        return cls(cores, drafter_threads_for(cores) if cores > 1 else 0)

    @property
    def target(self) -> int:
        return max(1, self.total - self.drafter)

    def __enter__(self) -> ThreadSplit:
        self._saved = torch.get_num_threads()
        torch.set_num_threads(self.total)
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self._saved)

    def alone(self) -> None:
        """The drafter idles: the target takes every core."""
        if torch.get_num_threads() != self.total:
            torch.set_num_threads(self.total)

    def beside_drafter(self) -> None:
        """The drafter works concurrently: the target keeps to the other cores."""
        if torch.get_num_threads() != self.target:
            torch.set_num_threads(self.target)


class NoSplit(ThreadSplit):
    """GPU targets, inline drafting: nothing to share."""

    def __init__(self):
        super().__init__(torch.get_num_threads(), 0)

    def __enter__(self) -> NoSplit:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def alone(self) -> None:
        pass

    def beside_drafter(self) -> None:
        pass
