"""Which waiting requests join the batch when rows are free: cache-aware, without starving anyone.

A request whose prompt starts like a sequence the prefix cache holds prefills only the rest, and
requests that share a prefix prefill it once when admitted together (packed: the shared part is fed
once). So among the waiting, those sharing the longest prefix with what is resident (recent
prompts and answers) or with those already chosen go first (SGLang's longest-prefix-match
scheduling; Helium groups agent calls the same way). Aging keeps it fair: a request waiting
longer than AGING_SECONDS goes before any of that, oldest first.

Residency is judged against the sequences the engine stored recently (a bounded list), not by
walking the prefix cache itself: eviction may have dropped some, which costs only a worse choice.
"""

from __future__ import annotations

from collections import deque

AGING_SECONDS = 2.0
RECENT_SEQUENCES = 32  # sequences remembered for judging residency


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix, by bisection on slice equality (compared in C)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


class Admission:
    """Chooses, among waiting requests (anything with `.prompt` and `.submitted`), whom to admit."""

    def __init__(self, aging_seconds: float = AGING_SECONDS):
        self.aging_seconds = aging_seconds
        self.recent: deque[list[int]] = deque(maxlen=RECENT_SEQUENCES)

    def stored(self, sequence: list[int]) -> None:
        """A sequence whose KV went into the prefix cache."""
        self.recent.append(sequence)

    def choose(self, waiting: list, slots: int, now: float) -> list:
        """Up to `slots` of `waiting` (in arrival order), in the order to prefill them."""
        if len(waiting) <= slots:
            return list(waiting)
        overdue = [request for request in waiting if now - request.submitted >= self.aging_seconds]
        chosen = overdue[:slots]
        rest = [request for request in waiting if request not in chosen]
        while len(chosen) < slots and rest:
            resident = [*self.recent, *(request.prompt for request in chosen)]
            best = max(
                rest,
                key=lambda request: (
                    max((common_prefix(request.prompt, other) for other in resident), default=0),
                    -request.submitted,
                ),
            )
            chosen.append(best)
            rest.remove(best)
        return chosen
