"""What a generation did, for users (`.stats`) and for the benchmark."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from saguaro.draft.stream import DraftSource


def add_counts(histogram: list[int], counts: list[int]) -> None:
    """histogram[n] += counts[n] for every n, growing the histogram as needed."""
    histogram += [0] * (len(counts) - len(histogram))
    for n, count in enumerate(counts):
        histogram[n] += count


@dataclass
class GenerationStats:
    method: str
    prompt_tokens: int = 0
    # Prompt tokens whose KV the target loaded from its prefix cache instead of computing them.
    reused_prompt_tokens: int = 0
    new_tokens: int = 0
    rounds: int = 0  # target forwards after the prefill
    drafted: int = 0
    accepted: int = 0
    accepted_histogram: list[int] = field(
        default_factory=list
    )  # [n] = rounds that drafted and accepted n drafts
    hits: int = 0  # rounds whose draft came from the speculation cache (method "saguaro")
    lookup_backups: int = 0  # rounds whose draft was copied from the sequence (prompt lookup)
    worker_failures: int = 0
    # The draft the drafters ran: quantization, vocabulary size, measured step costs and agreement
    # (draft_compression.DraftConfiguration as a dict); None for model-free methods.
    draft_configuration: dict | None = None
    # Before decoding: checking the weights, auto's choice, building the packed target and the
    # prepared draft (once per model pair; measurements once per machine, see model/disk_cache.py).
    setup_seconds: float = 0.0
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0  # the target waiting for drafts
    drafter_busy_seconds: float = 0.0  # drafter compute, overlapped or not (method "saguaro")
    verify_seconds: float = 0.0
    total_seconds: float = 0.0
    # One entry per round: drafted (draft tokens, a tree's nodes), accepted, depth (the deepest
    # draft: a chain's length, a tree's levels), source, draft_seconds (the target waiting for the
    # draft), verify_seconds (the target forward and acceptance) and, for saguaro, branches (the
    # outcomes pre-speculated while the previous round was verified).
    round_log: list[dict] = field(default_factory=list)

    def record_round(
        self,
        drafted: int,
        accepted: int,
        source: DraftSource = DraftSource.MODEL,
        draft_seconds: float = 0.0,
        verify_seconds: float = 0.0,
        branches: int = 0,
        depth: int | None = None,
    ) -> None:
        self.round_log.append(
            {
                "drafted": drafted,
                "accepted": accepted,
                "depth": drafted if depth is None else depth,
                "source": str(source),
                "branches": branches,
                "draft_seconds": draft_seconds,
                "verify_seconds": verify_seconds,
            }
        )
        self.draft_seconds += draft_seconds
        self.verify_seconds += verify_seconds
        self.rounds += 1
        self.hits += source == DraftSource.CACHE
        self.lookup_backups += source == DraftSource.LOOKUP
        self.drafted += drafted
        self.accepted += accepted
        if drafted:  # a round with speculation off accepts nothing because it proposed nothing
            add_counts(self.accepted_histogram, [0] * accepted + [1])

    @classmethod
    def merge(cls, rows: list[GenerationStats], concurrent: bool = False) -> GenerationStats:
        """One record for a batch: counts add up; times add up for rows that ran one after another,
        and are the longest row's for rows that ran `concurrent`ly (batched, sharing every forward)."""
        merged = cls(method=rows[0].method, draft_configuration=rows[0].draft_configuration)
        for row in rows:
            for name, value in vars(row).items():
                if isinstance(value, float) and concurrent:
                    setattr(merged, name, max(getattr(merged, name), value))
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    setattr(merged, name, getattr(merged, name) + value)
            merged.round_log += row.round_log
            add_counts(merged.accepted_histogram, row.accepted_histogram)
        return merged

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens the target kept."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per target forward (accepted drafts + the target's own token)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def hit_rate(self) -> float:
        """Share of rounds (after the first) whose draft was ready from the speculation cache."""
        return self.hits / (self.rounds - 1) if self.rounds > 1 else 0.0

    @property
    def target_idle_fraction(self) -> float:
        """Share of the decoding time the target spent waiting for drafts."""
        decode = self.total_seconds - self.prefill_seconds
        return self.draft_seconds / decode if decode > 0 else 0.0

    @property
    def drafter_idle_fraction(self) -> float:
        decode = self.total_seconds - self.prefill_seconds
        return max(0.0, 1 - self.drafter_busy_seconds / decode) if decode > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_seconds if self.total_seconds else 0.0

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "tokens_per_second": self.tokens_per_second,
            "hit_rate": self.hit_rate,
            "target_idle_fraction": self.target_idle_fraction,
            "drafter_idle_fraction": self.drafter_idle_fraction,
        }
