"""method="auto": the fastest method for this hardware and this model pair, by the cost model.

What wins depends on the machine more than on the models: where verifying K+1 tokens costs about
one step (GPUs, CPUs with native bf16) speculation pays; where it costs K+1 steps it does not; and
Saguaro's pre-speculation pays only where the drafter gets compute of its own (a spare core, a
second device) without slowing the target much. So nothing is assumed: on first use the target
and the drafter are timed briefly (a few forwards each, at the thread counts each method would
use), and `cost_model.project_tokens_per_second` turns those step costs and the acceptance seen so
far into a predicted speed per method. Timings are kept per (target, draft, threads) for the life
of the process, so one-shot `saguaro.generate` calls measure once, and on disk (model/disk_cache.py), so
a later process on the same machine measures nothing. With compile=True each model
is timed through the steps it will run (compiled graphs for the target and the chain drafter).
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from dataclasses import dataclass, field

import torch

from saguaro.model import disk_cache, weights
from saguaro.model.placement import ThreadSplit
from saguaro.model.tree import static_tree
from saguaro.tune import cost_model
from saguaro.tune.cost_model import PRIOR_ACCEPTANCE, PRIOR_HIT_RATE
from saguaro.tune.step_costs import forward_costs, greedy_token_cost

logger = logging.getLogger("saguaro")
CANDIDATES = ("autoregressive", "speculative", "tree", "saguaro")
SECOND_GUESS_SHARE = 0.5  # how much a sibling adds to a tree level, relative to the first guess
_CALIBRATION_CONTEXT = 32  # tokens of context while timing: enough to be representative, cheap


@dataclass
class Calibration:
    """Measured step costs: seconds of a forward vs new tokens, per model and thread count."""

    target_alone: cost_model.CostCurve  # every core
    target_beside: cost_model.CostCurve  # the cores a Saguaro worker leaves
    draft_alone: cost_model.CostCurve
    draft_beside: cost_model.CostCurve  # on the worker's threads, batched over branches
    # The chain drafter of `speculative` where it runs other steps than the rest: compiled graphs
    # with compile=True (the tree drafter and the Saguaro worker stay eager). None: draft_alone.
    draft_chain: cost_model.CostCurve | None = None
    # Seconds per token of compile=True's greedy decoding, in blocks of tokens per compiled call.
    # None: a one-token forward, target_alone(1).
    greedy_token: float | None = None


@dataclass
class Choice:
    method: str
    predicted_tokens_per_second: dict[str, float] = field(default_factory=dict)
    acceptance: float = PRIOR_ACCEPTANCE
    hit_rate: float = PRIOR_HIT_RATE


_calibrations: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _threads(count: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _timed(model, tokens: list[int], threads: int, compiled: bool = False) -> cost_model.CostCurve:
    with _threads(threads):
        return forward_costs(model, tokens, repeats=2, context=_CALIBRATION_CONTEXT, compiled=compiled)


def _timed_greedy(model, threads: int) -> float:
    with _threads(threads):
        return greedy_token_cost(model, repeats=2, context=_CALIBRATION_CONTEXT)


def calibrate(
    target, draft, lookahead: int, split: ThreadSplit, tree_nodes: int = 0, compiled: bool = False
) -> Calibration:
    """Time the target and the draft (cached per model pair and thread split). With `tree_nodes`,
    the target also verifies a tree that size: a forward's cost is not linear in its tokens (a
    matrix product's blocking steps up at some widths), so the tree's is measured, not
    extrapolated from a chain's (measured on the demo pair: 186 ms at 15 tokens where the line
    through 1 and 5 tokens said 154 ms, enough to choose `tree` over a faster `speculative`).

    `compiled` (compile=True): each model is timed through the steps it will run. The target's
    and the chain drafter's are compiled graphs, the tree drafter's and the worker's eager: timed
    eagerly, every method looked as slow as eager Python makes it, and on issue 12's small llama
    auto chose saguaro (eager drafting) at 719 tokens/s where compiled autoregressive ran 3395."""
    key = (id(draft), split.total, split.drafter, lookahead, compiled)
    per_target = _calibrations.setdefault(weights.source_of(target), {})
    if key not in per_target:
        entry = _disk_entry(target, draft, key)
        per_target[key] = _stored_calibration(entry) or _measured_calibration(
            target, draft, lookahead, split, compiled, entry
        )
    calibration = per_target[key]
    if tree_nodes and tree_nodes + 1 not in calibration.target_alone.points:
        tree = _timed(target, [tree_nodes + 1], split.total, compiled)
        calibration.target_alone.points.update(tree.points)
        disk_cache.store("calibration", _disk_entry(target, draft, key), _stored_form(calibration))
    return calibration


def _disk_entry(target, draft, key: tuple) -> str:
    models = [f(m) for m in (target, draft) for f in (disk_cache.model_key, disk_cache.variant)]
    return disk_cache.key("calibration", *models, *key[1:])


def _measured_calibration(target, draft, lookahead, split, compiled, entry) -> Calibration:
    chain = [1, lookahead + 1]
    beside = split.target if split.drafter else split.total
    branches = 3 * (lookahead + 1)  # the paper's default budget
    target_alone = _timed(target, chain, split.total, compiled)
    calibration = Calibration(
        target_alone=target_alone,
        # Without a split the target runs "beside" on all threads: the same forwards, timed once.
        target_beside=_timed(target, chain, beside, compiled) if beside != split.total else target_alone,
        draft_alone=_timed(draft, [1, 2, 4], split.total),
        draft_beside=_timed(draft, [1, 2, branches], max(1, split.drafter)),
        draft_chain=_timed(draft, [1, 2], split.total, compiled) if compiled else None,
        greedy_token=_timed_greedy(target, split.total) if compiled else None,
    )
    logger.info("saguaro auto: step costs measured %s", calibration)
    disk_cache.store("calibration", entry, _stored_form(calibration))
    return calibration


def _stored_form(calibration: Calibration) -> dict:
    return {
        name: value.points if isinstance(value, cost_model.CostCurve) else value
        for name, value in vars(calibration).items()
    }


def _stored_calibration(entry: str) -> Calibration | None:
    stored = disk_cache.load("calibration", entry)
    if stored is None:
        return None
    curves = {
        name: cost_model.CostCurve({int(tokens): seconds for tokens, seconds in value.items()})
        for name, value in stored.items()
        if isinstance(value, dict)
    }
    return Calibration(**{**stored, **curves})


def level_acceptance(acceptance: float, width: int) -> float:
    """Chance that one of `width` drafted siblings is accepted: each further sibling catches a
    SECOND_GUESS_SHARE of what the first misses (a rough model; measured acceptance refines it)."""
    return 1 - (1 - acceptance) ** (1 + SECOND_GUESS_SHARE * (width - 1))


def predict(
    calibration: Calibration,
    lookahead: int,
    tree_branching,
    acceptance: float,
    hit_rate: float,
    concurrent: bool,
    greedy: bool = True,
) -> dict[str, float]:
    """Predicted decode tokens/s per candidate method, each at its best draft length. `greedy`:
    compiled greedy decoding runs in blocks (`greedy_token`); sampling takes one-token steps."""
    c = calibration
    token = c.greedy_token if greedy and c.greedy_token else c.target_alone(1)
    rates = [acceptance] * lookahead
    ks = range(1, lookahead + 1)
    chain_draft = c.draft_chain or c.draft_alone
    predicted = {
        "autoregressive": 1.0 / token,
        "speculative": max(
            cost_model.project_tokens_per_second("speculative", k, c.target_alone, chain_draft, rates)
            for k in ks
        ),
    }
    if tree_branching:
        levels = list(tree_branching)
        nodes_per_level = [math.prod(levels[: d + 1]) for d in range(len(levels))]
        predicted["tree"] = cost_model.project_tokens_per_second(
            "tree",
            len(levels),
            c.target_alone,
            c.draft_alone,
            rates,
            tree_tokens=cost_model.expected_tokens(
                [level_acceptance(acceptance, w) for w in levels], len(levels)
            ),
            tree_nodes=sum(nodes_per_level),
            tree_levels=nodes_per_level,
        )
    if concurrent:  # Saguaro needs a drafter that runs beside the target

        def saguaro_at(k: int) -> float:
            # The budget the engine adapts to: the branches whose pre-speculation fits a verification.
            fits = cost_model.largest_budget_within(c.target_beside(k + 1), c.draft_beside, k)
            return cost_model.project_tokens_per_second(
                "saguaro",
                k,
                c.target_beside,
                c.draft_beside,
                rates,
                hit_rate=hit_rate,
                branches=max(1, fits),
            )

        predicted["saguaro"] = max(saguaro_at(k) for k in ks)
    return predicted


def choose(
    target,
    draft,
    lookahead: int,
    tree_branching,
    split: ThreadSplit,
    concurrent: bool,
    acceptance: float,
    hit_rate: float,
    compiled: bool = False,
    greedy: bool = True,
) -> Choice:
    tree_nodes = len(static_tree(list(tree_branching))) if tree_branching else 0
    calibration = calibrate(target, draft, lookahead, split, tree_nodes, compiled)
    predicted = predict(calibration, lookahead, tree_branching, acceptance, hit_rate, concurrent, greedy)
    method = max(predicted, key=predicted.get)
    logger.info("saguaro auto: chose %s (predicted tokens/s %s)", method, predicted)
    return Choice(method, predicted, acceptance, hit_rate)
