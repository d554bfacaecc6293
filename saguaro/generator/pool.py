"""The runner pool: the target as the runners run it (packed on CPU), the runners themselves (a
fresh eager one per call, or with compile=True one compiled runner per role kept across calls) and
both models' prefix caches."""

from __future__ import annotations

from saguaro.config import Options
from saguaro.draft.suffix import SuffixIndex
from saguaro.model.compiled_runner import CompiledRunner
from saguaro.model.packed_linear import runnable_target
from saguaro.model.prefix_cache import PrefixCache
from saguaro.model.runner import ModelRunner


class RunnerPool:
    def __init__(self, target, draft_model, options: Options, tensor_parallel: bool):
        self.model = target
        self.options = options
        # Compiled graphs pack weights their own way; a sharded target's other ranks run the plain model.
        self.pack = options.pack_target_weights and not options.compile and not tensor_parallel
        # What the packed target must leave free for what else the generator holds: a compressed
        # draft (at most the draft's size) and full prefix caches (target, draft, worker).
        draft_bytes = 0 if draft_model is None else sum(p.nbytes for p in draft_model.parameters())
        self.reserve_bytes = draft_bytes + 3 * (options.prefix_budget or 0)
        self.static_runners: dict[str, CompiledRunner] = {}
        self.new_prefix_caches()

    def new_prefix_caches(self) -> None:
        """Each model's prefix cache (None: off) holds the KV of earlier calls' sequences; the
        Saguaro worker keeps its own in its process."""
        size = self.options.prefix_budget
        self.target_prefixes = PrefixCache(size) if size is not None else None
        self.draft_prefixes = PrefixCache(size) if size is not None else None
        # What method="suffix" drafts from besides the sequence itself: every earlier call's.
        self.suffixes = SuffixIndex()

    def target(self):
        """The target the runners run: on CPU in bf16, a view with prepacked linears (the same
        products, faster: model/packed_linear.py), else the model itself. One per model and weight
        epoch, shared with every other generator of the model."""
        return runnable_target(self.model, self.pack, self.reserve_bytes)

    def target_runner(self, capacity: int, tree_size: int, blocks=()) -> ModelRunner:
        buckets = (1, tree_size + 1)
        return self.runner("target", self.target(), capacity, self.target_prefixes, buckets, blocks)

    def runner(self, role: str, model, capacity: int, prefixes, buckets, chains=()) -> ModelRunner:
        """A fresh eager runner, or with compile=True this role's compiled runner, kept across calls.
        Its static cache starts at static_capacity slots and doubles as a sequence needs it
        (`CompiledRunner.reserve`: a logged recompile, once per size), the prefill sizing it for at
        most PRESIZED_NEW_TOKENS of the call's `capacity` (the most it may hold), never all of it."""
        if not self.options.compile:
            return ModelRunner(model, capacity, prefixes)
        runner = self.static_runners.get(role)
        if runner is None or runner.model is not model:
            # Another model (weights rebuilt) keeps the size reached, whose graphs its shape shares.
            size = self.options.static_capacity if runner is None else runner.cache.capacity
            runner = CompiledRunner(model, size, prefixes, buckets, chains, role)
            self.static_runners[role] = runner
        runner.most = capacity
        runner.prefix_cache = prefixes
        runner.buckets = tuple(sorted(set(runner.buckets) | set(buckets)))
        runner.chains = tuple(sorted(set(runner.chains) | set(chains)))
        runner.reset()
        return runner

    def __getstate__(self) -> dict:
        # A copy starts with empty prefix caches (copying stored KV would cost memory for no
        # exactness) and suffix index, and compiles its own runners.
        return dict(vars(self), target_prefixes=None, draft_prefixes=None, suffixes=None, static_runners={})

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        self.new_prefix_caches()
