"""The method policy: which decoding method serves the next call and what follows from it (the
tree's shape, the CPU thread split, the draft-length controllers); with method="auto", the choice
from measured step costs and the acceptance (and Saguaro hit rate) seen over earlier calls."""

from __future__ import annotations

from saguaro.config import Method, Options, Placement, Schedule
from saguaro.decode.stats import GenerationStats
from saguaro.model.placement import NoSplit, ThreadSplit
from saguaro.model.tree import DynamicTree, static_tree
from saguaro.tune import auto
from saguaro.tune.cost_model import BatchLookaheads, LookaheadController, TreeDepthController

# How drafting time grows with the draft length, per method whose draft length adapts. Saguaro's
# drafter works while the target verifies: the target waits once per round, whatever the length.
# A tree adapts its depth (one draft forward per level; see TreeDepthController).
ADAPTIVE_DRAFT_COST = {
    Method.SPECULATIVE: "per_token",
    Method.PROMPT_LOOKUP: "free",
    Method.SUFFIX: "free",
    Method.SAGUARO: "per_round",
    Method.TREE: "per_token",
}


class MethodPolicy:
    """The current method and its controllers, kept across calls: what a step costs on this
    machine carries over from one prompt to the next."""

    def __init__(self, options: Options, target, has_draft: bool, tensor_parallel: bool):
        self.options = options
        self.on_cpu = target.device.type == "cpu"
        self.has_draft = has_draft
        self.tensor_parallel = tensor_parallel
        self.auto = options.method is Method.AUTO
        self.choice: auto.Choice | None = None
        self.counts = [0, 0, 0, 0]  # accepted, rejected, hits, rounds after the first
        # A batch's suffix copies, weighed each round against its draft model's chains
        # (decode/batched.py), per batch size, whatever the method.
        self.copy_lookaheads = BatchLookaheads(options.num_speculative_tokens, "free")
        first = options.method
        if self.auto:  # until the first call measures; without a draft, what earlier calls wrote
            first = Method.SPECULATIVE if has_draft else Method.SUFFIX
        self.configure(first)

    def configure(self, method: Method) -> None:
        """Everything that follows from the decoding method."""
        self.method = Method(method)
        branching = self.options.tree_branching
        self.tree_shape = None
        if self.method is Method.TREE:
            self.tree_shape = branching if isinstance(branching, DynamicTree) else list(branching)
        # On CPU the worker process and the target share the cores: split them (model/placement.py).
        cpu_worker = (
            self.method is Method.SAGUARO and self.options.placement is Placement.PROCESS and self.on_cpu
        )
        self.threads = ThreadSplit.for_cpu() if cpu_worker else NoSplit()
        self.lookahead = None
        if self.options.speculation_schedule is Schedule.ADAPTIVE and self.method in ADAPTIVE_DRAFT_COST:
            controller = TreeDepthController if self.method is Method.TREE else LookaheadController
            self.lookahead = controller(self.tree_extent()[0], ADAPTIVE_DRAFT_COST[self.method])
        # A batch runs Saguaro as batched chains (decode/batched.py): one draft forward per token.
        cost = ADAPTIVE_DRAFT_COST.get(self.method, "per_token")
        batch_cost = "per_token" if cost == "per_round" else cost
        self.batch_lookaheads = BatchLookaheads(self.options.num_speculative_tokens, batch_cost)

    def tree_extent(self) -> tuple[int, int]:
        """(deepest draft, most draft nodes) per round."""
        if isinstance(self.tree_shape, DynamicTree):
            return self.tree_shape.depth, self.tree_shape.budget
        if self.tree_shape:
            return len(self.tree_shape), len(static_tree(self.tree_shape))
        k = self.options.num_speculative_tokens
        return k, k

    def choose(self, target, draft, greedy: bool) -> None:
        """method="auto": the method the cost model predicts fastest, from step costs measured once
        (with the draft the drafters will run: `draft`) and the acceptance and hit rate so far."""
        split = (
            ThreadSplit.for_cpu()
            if self.on_cpu and self.options.placement is Placement.PROCESS
            else NoSplit()
        )
        concurrent = self.options.placement is not Placement.INLINE and (split.drafter > 0 or not self.on_cpu)
        accepted, rejected, hits, rounds = self.counts
        acceptance = (accepted + 7 * auto.PRIOR_ACCEPTANCE) / (accepted + rejected + 7)
        hit_rate = (hits + 7 * auto.PRIOR_HIT_RATE) / (rounds + 7)
        branching = self.options.tree_branching
        self.choice = auto.choose(
            target,
            draft,
            self.options.num_speculative_tokens,
            None if isinstance(branching, DynamicTree) else branching,
            split,
            concurrent,
            acceptance,
            hit_rate,
            self.options.compile,
            greedy,
        )
        if self.choice.method != self.method:
            self.configure(Method(self.choice.method))

    def learn(self, stats: GenerationStats) -> None:
        """Keep method="auto"'s acceptance and hit-rate estimates current."""
        drafted_rounds = [r for r in stats.round_log if r["drafted"]]
        self.counts[0] += sum(r["accepted"] for r in drafted_rounds)
        # A draft was refused where the accepted path stops short of its depth: a tree's path is
        # never as long as its node count, so counting against that would call every tree round a
        # rejection. (A tree level's acceptance, with its siblings, is what a tree round measures.)
        self.counts[1] += sum(r["accepted"] < r["depth"] for r in drafted_rounds)
        if self.method is Method.SAGUARO:
            self.counts[2] += stats.hits
            self.counts[3] += max(0, len(drafted_rounds) - 1)

    def seed_saguaro_lookahead(self, target, draft) -> None:
        """Show Saguaro's adaptive schedule the step costs `auto` times once per process (the
        target alone for a plain step, beside the worker for a verification), so that where
        verification costs about K+1 steps (a CPU without native bf16) the very first round is a
        plain step, since no draft pays at a typical acceptance (elsewhere the controller starts
        unseeded: see `LookaheadController.seed`). A few forwards, once per process;
        `method="auto"` has them already."""
        # A tensor-parallel target is not timed: its other ranks could not follow the leader's forwards.
        if self.lookahead is None or self.lookahead.verify or self.tensor_parallel:
            return
        k = self.options.num_speculative_tokens
        calibration = auto.calibrate(target, draft, k, self.threads)
        # At auto's prior acceptance, not all-accepted drafts: 6 tokens all accepted would pay at
        # 5.8 steps (a 7-token verification without native bf16, emulated on the demo pair),
        # where the first round's 6-deep draft cost a chat prompt a quarter of its time.
        timed = {1: calibration.target_alone(1), k + 1: calibration.target_beside(k + 1)}
        self.lookahead.seed(timed, acceptance=auto.PRIOR_ACCEPTANCE)
