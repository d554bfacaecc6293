"""A call's rows decoded with a generator's parts: a batch as one (decode/batched.py), or row after
row (decode/engines.py; with a tensor-parallel target, rank 0 decodes and the others follow)."""

from __future__ import annotations

import functools
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

from saguaro.config import Method
from saguaro.decode.batched import batched_speculative
from saguaro.decode.batched_drafters import BatchedModelDrafter, PerRowDrafters
from saguaro.decode.engines import StopRule, autoregressive, speculative
from saguaro.decode.sampling import TokenSampler
from saguaro.decode.stats import GenerationStats
from saguaro.distributed.consensus import Consensus
from saguaro.draft.drafters import InlineDrafts, ModelDrafter, PromptLookupDrafter
from saguaro.draft.stream import DraftStream
from saguaro.draft.suffix import SuffixDrafter
from saguaro.faults import logger
from saguaro.model.batched_runner import BatchedRunner
from saguaro.model.compiled_runner import CHAIN_FEED, GREEDY_BLOCK

if TYPE_CHECKING:  # the parts a generator hands over; decoding builds none of them
    from saguaro.generator.draft_side import DraftSide
    from saguaro.generator.policy import MethodPolicy
    from saguaro.generator.pool import RunnerPool

Result = tuple[list[int], GenerationStats]  # a row's new tokens and its stats


class Decoder:
    def __init__(self, target, tp, policy: MethodPolicy, pool: RunnerPool, drafts: DraftSide):
        self.target, self.tp = target, tp
        self.policy, self.pool, self.drafts = policy, pool, drafts
        self.decode_start: float | None = None  # the call's, for .stats.setup_seconds

    def rows(self, prompts: list[list[int]], samplers: list[TokenSampler], stops: list[StopRule]):
        """Each row's (new tokens, stats), and whether they ran as one batch."""
        self.decode_start = None
        # A tensor-parallel target decodes rows one after another (its ranks replay one runner).
        batched = len(prompts) > 1 and (self.policy.method.batched or self.policy.auto) and self.tp is None
        if batched:
            return self._batch(prompts, samplers, stops), True
        return [self._row(*row) for row in zip(prompts, samplers, stops)], False

    def _batch(self, prompts, samplers, stops) -> list[Result]:
        """All rows at once (decode/batched.py): one target forward per round for every live row.

        Saguaro's pre-speculation of every row's outcomes would multiply the drafter's work by the
        batch, and a tree (which "auto" may choose) has no batched loop: both serve a batch with
        batched chains, exact all the same.
        """
        method = self.policy.method
        if method in (Method.SAGUARO, Method.TREE):
            method = Method.SPECULATIVE
            logger.info(
                "saguaro: method=%r serves a batch with batched speculative decoding", self.policy.method
            )
        stats = [GenerationStats(method=str(method), prompt_tokens=len(prompt)) for prompt in prompts]
        drafter = None
        if method is Method.SPECULATIVE:
            draft = self.drafts.prepare(prompts[0], self.pool.target(), self.policy.threads)
            for row_stats in stats:
                row_stats.draft_configuration = asdict(self.drafts.configuration)
            vocab = self.target.config.vocab_size
            drafter = BatchedModelDrafter(draft, samplers[0].drafting(), vocab, self.pool.draft_prefixes)
        elif method is Method.PROMPT_LOOKUP:
            drafter = PerRowDrafters(PromptLookupDrafter)
        elif method is Method.SUFFIX:
            drafter = PerRowDrafters(functools.partial(SuffixDrafter, self.pool.suffixes))
        target = self.pool.target()
        self.decode_start = time.perf_counter()
        lookaheads = self.policy.batch_lookaheads
        new = batched_speculative(
            BatchedRunner(target, self.pool.target_prefixes),
            drafter,
            prompts,
            samplers,
            stops,
            stats,
            self.policy.options.num_speculative_tokens,
            lookaheads if self.policy.lookahead is not None and drafter is not None else None,
        )
        for row, row_stats in zip(new, stats):
            row_stats.new_tokens = len(row)
        return list(zip(new, stats))

    def _row(self, prompt: list[int], sampler: TokenSampler, stop: StopRule) -> Result:
        """One row; with a tensor-parallel target, rank 0 decodes and the other target ranks follow."""
        if self.tp is None:
            return self._one(prompt, sampler, stop)
        consensus = Consensus(self.tp)
        if not consensus.leads:
            runner = self.pool.target_runner(self._capacity(prompt, stop), self.policy.tree_extent()[1])
            new = consensus.follow(runner, prompt)
            runner.remember(prompt + new)
            stop.stream(new)
            return new, GenerationStats(
                method=str(self.policy.method), prompt_tokens=len(prompt), new_tokens=len(new)
            )
        try:
            new, stats = self._one(prompt, sampler, stop, consensus)
        except BaseException:
            consensus.abort()
            raise
        consensus.finish(new)
        return new, stats

    def _capacity(self, prompt: list[int], stop: StopRule) -> int:
        return len(prompt) + stop.max_new_tokens + self.policy.tree_extent()[1] + 1

    def _one(self, prompt, sampler, stop, consensus=None) -> Result:
        policy = self.policy
        max_depth, tree_size = policy.tree_extent()
        capacity = self._capacity(prompt, stop)
        # Autoregressive greedy decoding runs in compiled blocks (engines.autoregressive).
        greedy_blocks = policy.method is Method.AUTOREGRESSIVE and not sampler.config.do_sample
        runner = self.pool.target_runner(capacity, tree_size, ((GREEDY_BLOCK, 1),) if greedy_blocks else ())
        if consensus is not None:
            runner = consensus.lead(runner)
        owners = [runner]  # whose KV is stored for later calls (the worker stores its own)
        stats = GenerationStats(method=str(policy.method), prompt_tokens=len(prompt))
        if not policy.method.model_free:
            self.drafts.prepare(prompt, self.pool.target(), policy.threads)
            stats.draft_configuration = asdict(self.drafts.configuration)
        start = time.perf_counter()
        self.decode_start = self.decode_start or start
        if policy.method is Method.AUTOREGRESSIVE:
            new = autoregressive(runner, prompt, sampler, stop, stats)
        else:
            drafts = self._draft_stream(sampler, capacity, max_depth, owners)
            # A Saguaro worker process flags its work: once it idles, the target takes the worker's
            # core back for the rest of its forward.
            with policy.threads, policy.threads.hand_back_when_idle(self.pool.target(), drafts.working):
                new = speculative(
                    runner,
                    drafts,
                    prompt,
                    sampler,
                    stop,
                    stats,
                    max_depth,
                    policy.lookahead,
                    policy.threads,
                    self.drafts.draft_inline,
                )
        # Each cache holds a prefix of prompt + the untrimmed generation, and so of prompt + new.
        for owner in owners:
            owner.remember(prompt + new)
        stats.total_seconds = time.perf_counter() - start
        stats.new_tokens = len(new)
        return new, stats

    def _draft_stream(
        self, sampler: TokenSampler, capacity: int, max_depth: int, owners: list
    ) -> DraftStream:
        """Where this call's drafts come from: the Saguaro worker, or a drafter drafting inline
        (a model drafter joins `owners`, whose KV is stored for later calls)."""
        policy, draft = self.policy, self.drafts.draft
        if policy.method is Method.SAGUARO:
            policy.seed_saguaro_lookahead(self.pool.target(), draft)
            worker = self.drafts.start_worker(policy.threads)
            worker.sample_as(sampler)
            return worker
        if policy.method is Method.PROMPT_LOOKUP:
            return InlineDrafts(PromptLookupDrafter())
        if policy.method is Method.SUFFIX:  # it joins `owners` to publish the call's last tokens
            drafter = SuffixDrafter(self.pool.suffixes)
            owners.append(drafter)
            return InlineDrafts(drafter)
        # A tree is drafted level by level on top of cached levels, shapes no bucket covers.
        draft_runner = None
        if policy.tree_shape is None:
            # A round feeds the draft the 1 or 2 committed tokens it lacks, then 1 per draft;
            # greedy, one compiled call drafts the whole chain, of any length up to max_depth.
            lengths = () if sampler.config.do_sample else range(1, max_depth + 1)
            chains = tuple((k, CHAIN_FEED) for k in lengths)
            draft_runner = self.pool.runner(
                "draft", draft, capacity, self.pool.draft_prefixes, (1, 2), chains
            )
        drafter = ModelDrafter(
            draft,
            sampler.drafting(),
            self.target.config.vocab_size,
            capacity,
            policy.tree_shape,
            self.pool.draft_prefixes,
            draft_runner,
        )
        owners.append(drafter)
        return InlineDrafts(drafter)
