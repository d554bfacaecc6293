"""Who computes where: the target's and the Saguaro drafter's share of the CPU.

On a CPU the drafter worker and the target compete for the same cores. Oversubscribing them
(both at all threads, as a forked worker inherits) makes both slow, so while the drafter works
beside the target the target runs on the cores the drafter does not use; while the drafter idles
(prefill, rounds with speculation off) the target takes every core again. "Every core" is the
caller's budget: the threads it gave torch when the generator was built (a caller that keeps cores
for other work gets no more than it set), and the caller's setting is restored when the call ends.

Pre-speculation usually ends before the verification it overlaps (its branches are sized to fit,
and it stops once the outcome arrives). From then on the drafter's core would idle, so a shared
flag is up while the worker works (a request, then its pre-speculation), and the target, checking
it before each of its layers, takes every core back for the rest of its forward
(`hand_back_when_idle`).
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch
from torch import nn


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
        """The split of `cores`, by default the caller's budget: the threads it gave torch
        (`torch.set_num_threads`), never more than the cores this process may run on."""
        cores = cores or min(torch.get_num_threads(), available_cores())
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

    @contextlib.contextmanager
    def hand_back_when_idle(self, model, working):
        """While inside: before each of `model`'s layers, the target takes every core if `working`
        (a shared flag: `.value`, 0 while the worker idles) is down; `alone` does nothing when it
        has them already. Changing the thread count between layers is safe: each layer's kernels
        start afresh."""
        if working is None or self.drafter == 0:
            yield
            return

        def take_back():
            if not working.value:
                self.alone()

        with before_each_layer(model, take_back):
            yield


@contextlib.contextmanager
def before_each_layer(model, hook):
    """While inside: `hook()` runs before each of `model`'s decoder layers (none if it has no
    stack of them), on this thread only: a forward of the same model elsewhere (a drafter given up
    and drafting inline) is not this caller's business. A compiled forward is one graph over every
    layer, with no boundary between layers to act at, so the hook traces to nothing there."""
    layers, owner = _decoder_layers(model), threading.get_ident()

    def pre_hook(module, args):
        if not torch.compiler.is_compiling() and threading.get_ident() == owner:
            hook()

    handles = [layer.register_forward_pre_hook(pre_hook) for layer in layers or []]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _decoder_layers(model) -> nn.ModuleList | None:
    """The model's stack of decoder layers: its longest ModuleList (None if it has none)."""
    stacks = [module for module in model.modules() if isinstance(module, nn.ModuleList)]
    return max(stacks, key=len, default=None)


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
