"""CompiledRunner: a ModelRunner whose decoding steps are compiled graphs of fixed shape.

An eager HF forward of a small model is mostly Python (module calls, mask building, cache
bookkeeping: ~2 ms on a CPU) around microseconds of arithmetic, and on a GPU it launches kernels
one by one. `torch.compile` removes both - inductor on CPU, CUDA graphs (mode="reduce-overhead")
on GPU - but only for shapes it has seen. So every step here has a fixed shape:
  * the KV cache is a `StaticKVCache` (fixed capacity, written at a slot given by a tensor);
  * T new tokens are padded up to a bucket (1, 2, K + 1, ...: `buckets`), so the few graphs
    compiled at warm-up serve every step after it; padded tokens write past the real ones, where
    nothing sees them, and are written over later;
  * the mask is built inside the graph from the write position and the tree's ancestor matrix,
    which is made once per tree shape; no O(L^2) mask exists anywhere: a step's is [T, capacity].
A forward over more tokens than the largest bucket (a prefill) runs the same step function eagerly:
compiling one graph per prompt length would cost more than it saves.
The capacity is part of every graph's shape, so it changes seldom: a runner starts at a static
capacity (256 by default), sized before a prefill for the prompt plus up to PRESIZED_NEW_TOKENS new
tokens, and doubles whenever a forward's tokens would not fit (mid-call too: never an allocation
for what max_new_tokens allows but the sequence never reaches). Each growth keeps the entries,
recompiles the runner's buckets and chains once at the new shape (seconds to minutes on a CPU), and
is logged; graphs are kept per capacity, so a size compiles once per process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types

import torch

from saguaro.model.hf_call import additive_masks, cache_keyword, logits
from saguaro.model.prefix_cache import PrefixCache
from saguaro.model.runner import ModelRunner
from saguaro.model.static_cache import StaticKVCache, note_growth
from saguaro.model.tree import TokenTree

# Graphs per kind of model: every bucket and greedy chain length of one configuration (about 10,
# near torch's default limit of 8), times each capacity and draft length a process uses. A process
# comparing configurations (a benchmark, the test suite under --compile) passed 64.
RECOMPILE_LIMIT = 256
# Static caches hold at least this many entries (SpeculativeGenerator's static_capacity) and grow by
# doubling: a call that fits the current capacity reuses its graphs (a capacity is part of a graph's
# shape), and a sequence of L tokens costs at most log2(L / 256) growths, each compiled once a process.
STATIC_CAPACITY = 256
# New tokens a prefill sizes the static cache for at most (when max_new_tokens asks for more, the
# cache grows during the call as the sequence does): a long answer costs one growth up front rather
# than one per doubling, and max_new_tokens=10**9 allocates nothing huge.
PRESIZED_NEW_TOKENS = 1024
# Greedy tokens per compiled call in autoregressive decoding: the call's fixed cost (guards,
# launching the graph, the engine's bookkeeping) is shared by this many tokens.
GREEDY_BLOCK = 8
# Tokens a drafter's greedy chain starts from, padded to this: it lacks 1 or 2 committed tokens
# (2 after a round that accepted every draft), and one width keeps one graph per chain length.
# Autoregressive blocks always start from one token, and feed exactly one: a one-row first step
# takes inductor's one-row products, where two rows would call BLAS (15% of a token's time).
CHAIN_FEED = 2

logger = logging.getLogger("saguaro")


def grown_capacity(capacity: int, needed: int) -> int:
    """`capacity` doubled until `needed` entries fit: capacities stay on one lattice (256, 512, ...),
    so runners and calls share each size's graphs and a sequence of L tokens meets log2(L) sizes."""
    while capacity < needed:
        capacity *= 2
    return capacity


def check_compilable(*models) -> None:
    """Clear errors for models whose steps cannot run on a static cache."""
    for model in models:
        if model is not None and getattr(model.config, "sliding_window", None):
            raise ValueError(
                f"compile=True does not support sliding-window attention ({type(model).__name__} has "
                f"sliding_window={model.config.sliding_window}); pass compile=False for this model"
            )
        if model is not None and cache_keyword(model) != "cache":
            # The compiled steps pass the cache by transformers 5's name (`decode_step`).
            raise ValueError(
                f"compile=True needs a model whose forward takes `cache` ({type(model).__name__}'s "
                "takes only `past_key_values`); pass compile=False for this model"
            )


def check_static_capacity(capacity) -> None:
    """A clear error for a static_capacity that cannot size a static KV cache."""
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
        raise ValueError(
            f"static_capacity (compile=True's first static KV cache size, in tokens; it doubles as a "
            f"sequence needs) must be a positive int, got {capacity!r}"
        )


# A pointwise value whose body has more ops than this is stored once, not recomputed where it is
# read (inductor's CPU default is 50). The query's rotary embedding (a cos and a sin per element)
# is read through a broadcast by every cache slot's attention score, and was recomputed there:
# 4 heads x 256 slots x 64 dims of cos and sin a layer, about a fifth of a compiled greedy token.
REALIZE_OPCOUNT_THRESHOLD = 8


def compile_settings(device: torch.device) -> dict:
    """CUDA graphs on GPU (a step's launches replayed as one). On CPU, inductor with one-row matrix
    products turned into generated multiply-and-sum loops: at T = 1 each of a step's ~30 small
    products otherwise pays a BLAS call's fixed cost, most of the step (measured: 2.7x faster steps);
    with rotary embeddings computed once a step (`REALIZE_OPCOUNT_THRESHOLD`); and with inductor's
    C++ wrapper: a greedy block's graph allocates ~600 intermediate buffers, each a Python call in
    the default wrapper (measured: 4.2-4.6x HF greedy against 3.8-3.9x, for ~30 s more compile)."""
    if device.type == "cuda":
        return {"mode": "reduce-overhead"}
    return {
        "options": {
            "post_grad_fusion_options": {"decompose_mm_pass": {}},
            "realize_opcount_threshold": REALIZE_OPCOUNT_THRESHOLD,
            "cpp_wrapper": True,
        }
    }


@contextlib.contextmanager
def products_attention(model):
    """On CPU, the compiled steps attend through the model's own "eager" attention (matrix products
    and a softmax), which inductor fuses with the rest of the step, where SDPA stays one opaque
    call per layer with a fixed cost (measured on the small llama: 7% of a compiled greedy token).
    Set only around compiled calls and restored after, sub-configs included: the user's model, and
    this runner's eager forwards (a prefill, where SDPA's memory use is what fits), keep theirs.
    On GPU, SDPA's fused kernels are the fast path: nothing changes."""
    config = model.config
    if model.device.type == "cuda":
        yield
        return
    configs = [config, *(getattr(config, key, None) for key in config.sub_configs)]
    saved = [(c, c._attn_implementation_internal) for c in configs if c is not None]
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        for c, implementation in saved:
            c._attn_implementation_internal = implementation


def decode_step(model, cache, ids, depths, ancestors, tree_start, keep_last: int):
    """Logits [T, V] of `ids` [1, T]: node i sits at position tree_start + depths[i], sees every slot
    before tree_start and slot tree_start + j where ancestors[i, j] (j < W, the tree's width)."""
    capacity, width = cache.capacity, ancestors.shape[1]
    slots = torch.arange(capacity, device=ids.device)
    relative = slots - tree_start
    in_tree = (relative >= 0) & (relative < width)
    visible = (slots < tree_start)[None, :] | (ancestors[:, relative.clamp(0, width - 1)] & in_tree[None, :])
    mask = additive_masks(visible[None, None], model.get_input_embeddings().weight.dtype)
    # By its name in transformers 5, which `check_compilable` checks: a graph cannot inspect signatures.
    return logits(model, "cache", cache, ids, (tree_start + depths)[None], mask, keep_last)[0]


def greedy_steps(model, cache, ids, fed, steps: int, vocab: int | None):
    """Greedy continuation, `steps` tokens long, of ids[0, :fed] (not yet in the cache; `ids` [1, B]
    padded, written from slot cache.start): the first forward feeds them, each later one the previous
    argmax, fed back on the device, and the [steps] tokens come back together: one call, one host
    read, no wait per token. Argmaxes range over the first `vocab` ids (None: all)."""
    first = cache.start.clone()
    rows = ids.shape[1]
    depths = torch.arange(rows, device=ids.device)
    chain = torch.ones(rows, rows, dtype=torch.bool, device=ids.device).tril()
    logits = decode_step(model, cache, ids, depths, chain, first, 0)
    token = logits.index_select(0, (fed - 1).reshape(1))[:, :vocab].argmax(-1)
    tokens = [token]
    for step in range(steps - 1):
        slot = first + fed + step
        cache.start.copy_(slot)
        logits = decode_step(model, cache, token[None], depths[:1] * 0, chain[:1, :1], slot, 0)
        token = logits[:, :vocab].argmax(-1)
        tokens.append(token)
    return torch.cat(tokens)


def model_signature(model) -> tuple:
    """What a compiled step's graphs depend on besides its inputs' shapes: models alike in all of
    it (the same model in another generator, a copy) share graphs."""
    return type(model).__qualname__, model.config.to_json_string(), str(model.dtype), model.device.type


@functools.cache
def compiled(step, signature: tuple):
    """`step` compiled for one kind of model (`model_signature`). Dynamo keeps a code object's graphs
    in one list, checked in order on every call and capped (recompile_limit): each kind of model gets
    its own copy of the code, so a process running many (a test session, drafts being compared)
    neither hits the cap nor slows every call's lookup."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    copy = types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__, step.__defaults__)
    settings = compile_settings(torch.device(signature[-1]))
    return torch.compile(copy, fullgraph=True, dynamic=False, **settings)


@functools.lru_cache(maxsize=256)
def tree_layout(parents: tuple[int, ...], cached_nodes: int, rows: int, device) -> tuple:
    """(depths [rows], ancestors [rows, width]) of the tree's new nodes, padded to `rows`; made once
    per tree shape. A padded row sits at depth 0 (a position the model surely has) and sees only
    itself: a row that sees nothing would be NaN."""
    tree = TokenTree(parents)
    width = max(len(tree), cached_nodes + rows)
    depths = torch.zeros(rows, dtype=torch.long)
    ancestors = torch.zeros(rows, width, dtype=torch.bool)
    new = len(tree) - cached_nodes
    depths[:new] = torch.tensor(tree.depths()[cached_nodes:], dtype=torch.long)
    ancestors[:new, : len(tree)] = tree.ancestor_mask()[cached_nodes:]
    padded = torch.arange(new, rows)
    ancestors[padded, cached_nodes + padded] = True
    return depths.to(device), ancestors.to(device)


class CompiledRunner(ModelRunner):
    """A ModelRunner over a `StaticKVCache` whose forwards of up to max(buckets) tokens on top of
    the committed context run as compiled graphs, one per bucket.

    `capacity` is the static cache's first size; it doubles as the sequence needs (`reserve`).
    `most` (set per call by its owner) is the most entries the call may hold: a prefill sizes the
    cache for min(most, prompt + PRESIZED_NEW_TOKENS). `role` names the runner in the growth log."""

    greedy_steps = True

    def __init__(
        self,
        model,
        capacity: int,
        prefix_cache: PrefixCache | None = None,
        buckets: tuple[int, ...] = (1,),
        chains: tuple[tuple[int, int], ...] = (),
        role: str = "model",
    ):
        check_compilable(model)
        super().__init__(model, capacity, prefix_cache)
        self.role = role
        self.most: int | None = None
        self.buckets = tuple(sorted(set(buckets)))
        self.chains = tuple(sorted(set(chains)))  # greedy_chain (steps, width) to compile at once
        signature = model_signature(model)
        self._step = compiled(decode_step, signature)
        self._greedy_steps = compiled(greedy_steps, signature)
        self._compiled_buckets: set[int] = set()
        self._compiled_chains: set[int] = set()
        self._tree_start = torch.zeros((), dtype=torch.long, device=model.device)
        if model.device.type == "cuda":
            torch._dynamo.mark_static_address(self._tree_start, guard=False)

    def _new_cache(self, layers: int, capacity: int) -> StaticKVCache:
        return StaticKVCache(layers, capacity, self.device)

    def reserve(self, needed: int) -> bool:
        """Room for `needed` entries: the static cache doubles until they fit, keeping its entries
        (whether it grew). A capacity is part of every graph's shape, so each bucket and chain then
        compiles again at the new one (the next feed, or `_warm_up`), once per size and process."""
        old = self.cache.capacity
        if needed <= old:
            return False
        note_growth()
        new = grown_capacity(old, needed)
        if self._compiled_buckets or self._compiled_chains:
            # Worth a warning: on a CPU this stalls the call for seconds to minutes.
            logger.warning(
                "saguaro: compile=True: the %s's static KV cache grows from %d to %d slots (%d needed); "
                "its compiled steps recompile for the new shape now (%d graphs, once per size and "
                "process). To compile at a large enough size from the start, pass static_capacity=%d "
                "to SpeculativeGenerator (saguaro.generate, saguaro.enable)",
                self.role,
                old,
                new,
                needed,
                len(set(self.buckets)) + len(set(self.chains)),
                new,
            )
        self.cache.grow(new)
        self._compiled_buckets.clear()
        self._compiled_chains.clear()
        return True

    def _warm_up(self) -> None:
        """Compile every bucket's and chain's graph not yet compiled at this capacity, by running
        each past the committed entries (then dropped), so that compile time lands here, not in a
        round that the draft-length controller measures."""
        length = self.length
        for bucket in sorted(set(self.buckets) - self._compiled_buckets):
            if length + bucket <= self.cache.capacity:
                self.forward([0] * bucket)
                self.rollback(length)
                self._compiled_buckets.add(bucket)
        for steps, width in sorted(set(self.chains) - self._compiled_chains):
            if self.greedy_chain([0], steps, width=width) is not None:
                self.rollback(length)
                self._compiled_chains.add((steps, width))

    def feed(self, tokens: list[int]) -> tuple[torch.Tensor, int]:
        """As `ModelRunner.feed`; a prefill first sizes the cache for the prompt and what the call is
        likely to add (min(most, prompt + PRESIZED_NEW_TOKENS): one growth now rather than one per
        doubling later), and the first feed at a capacity compiles every bucket's graph."""
        if self.length == 0:
            most = len(tokens) if self.most is None else self.most
            self.reserve(max(len(tokens), min(most, len(tokens) + PRESIZED_NEW_TOKENS)))
        result = super().feed(tokens)
        self._warm_up()
        return result

    @torch.no_grad()
    def forward(
        self, tokens, tree: TokenTree | None = None, cached_nodes: int = 0, last_only: bool = False
    ) -> torch.Tensor:
        """As `ModelRunner.forward`; `last_only` returns [1, V], computed with the rest in a bucket."""
        tokens, tree = self._new_nodes(tokens, tree, cached_nodes)
        count = len(tokens)
        if self.reserve(self.length + count) and self.cache.layers[0].is_initialized:
            # Grown mid-call: every graph compiles now at the new size, rather than one in each of
            # the next rounds.
            self._warm_up()
        # The buffers take their shapes from the first forward: it runs eagerly, so no graph ever
        # initialises them.
        compilable = cached_nodes == 0 and self.cache.layers[0].is_initialized
        bucket = next((b for b in self.buckets if b >= count), None) if compilable else None
        if bucket is not None and self.length + bucket > self.cache.capacity:
            # The tokens fit but their padding would not: one eager step rather than a growth.
            bucket = None
        rows = bucket or count
        # Built on the model's device: tokens drafted there (a tensor) are padded without a host read.
        ids = torch.zeros(1, rows, dtype=torch.long, device=self.device)
        ids[0, :count] = self.hf.embeddable(tokens)
        depths, ancestors = tree_layout(tuple(tree.parents), cached_nodes, rows, self.device)
        self._tree_start.fill_(self.length - cached_nodes)
        self.cache.begin_write(self.length, rows)
        inputs = (self.model, self.cache, ids, depths, ancestors, self._tree_start)
        if bucket is not None:
            with products_attention(self.model):
                logits = self._step(*inputs, 0)
            logits = logits[count - 1 : count] if last_only else logits[:count]
        else:
            logits = decode_step(*inputs, int(last_only))
        self.cache.length += count
        return logits

    @torch.no_grad()
    def greedy_chain(
        self, tokens: list[int], steps: int, vocab: int | None = None, width: int = CHAIN_FEED
    ) -> list[int] | None:
        """The `steps` greedy tokens after `tokens` (at most `width`, appended, not yet in the
        cache; padded to `width`), in one compiled call; the cache then holds `tokens` and all the
        new ones but the last. None where no graph applies (the first forward, more tokens, no
        room): the caller steps instead, and its forward grows the cache once a token needs it
        (a chain's padding and its steps past a stop never do)."""
        if (
            not self.cache.layers[0].is_initialized
            or not 0 < len(tokens) <= width
            or self.length + width + steps > self.cache.capacity
        ):
            return None
        ids = torch.zeros(1, width, dtype=torch.long)
        ids[0, : len(tokens)] = self.hf.embeddable(torch.tensor(tokens))
        fed = torch.tensor(len(tokens))
        self.cache.begin_write(self.length, width)
        with products_attention(self.model):
            new = self._greedy_steps(
                self.model, self.cache, ids.to(self.device), fed.to(self.device), steps, vocab
            )
        self.cache.length += len(tokens) + steps - 1
        return new.tolist()

    def greedy_block(self, token: int) -> list[int]:
        """The next GREEDY_BLOCK greedy tokens after `token` (see greedy_chain); a caller that needs
        fewer (a stop, max_new_tokens) drops the rest: the extra steps only cost their compute."""
        return self.greedy_chain([token], GREEDY_BLOCK, width=1) or [int(self.forward([token])[-1].argmax())]
