"""do_sample=True output is distributed exactly as the target's own sampling (chi-square tests).

Each test also plants the classic mistake (HF #47932: the draft token is not drawn from the q
used in the acceptance ratio) and checks that the same test then fails, so a pass means something.
"""

import pytest
import torch
from conftest import tiny_model
from stats_helpers import argmax_with_sampled_q, chi_square_pvalue, reference_probs

import saguaro
from saguaro.decode import engines
from saguaro.decode.sampling import SamplingConfig, TokenSampler
from saguaro.decode.verify import verify_chain_sampled, verify_tree_sampled
from saguaro.decode.verify_walk import verify_tree_sampled_walk
from saguaro.draft.drafters import ModelDrafter
from saguaro.model.tree import TokenTree
from saguaro.ssd.prespeculation import PreSpeculator

PASS_P = 1e-3  # a correct sampler fails this once in a thousand seeds; our seeds are fixed
FAIL_P = 1e-6


TREE_VERIFIERS = {"tree_walk": verify_tree_sampled_walk, "tree_tensor": verify_tree_sampled}
VERIFIERS = {
    # The per-node walk and the tree tensor version over a tree that is a chain, and the chain's own.
    **{
        name: lambda p, q, drafts, sampler, verify=verify: verify(p, q, drafts, TokenTree.chain(3), sampler)
        for name, verify in TREE_VERIFIERS.items()
    },
    "chain_tensor": verify_chain_sampled,
}


def synthetic_round(draw_greedy: bool, trials: int, seed: int = 0, verifier: str = "tree_walk"):
    """Verify K=3 drafts against fixed p's; return counts of the first and second emitted tokens."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.tensor(
        [
            [0.5, 0.2, 0.15, 0.1, 0.05],
            [0.1, 0.1, 0.6, 0.1, 0.1],
            [0.3, 0.3, 0.2, 0.1, 0.1],
            [0.2, 0.2, 0.2, 0.2, 0.2],
        ]
    )
    q = torch.tensor([[0.1, 0.6, 0.1, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2], [0.05, 0.05, 0.1, 0.3, 0.5]])
    sampler = TokenSampler(SamplingConfig(do_sample=True), gen)
    first, second = torch.zeros(5), torch.zeros(5)
    for _ in range(trials):
        drafts = q.argmax(-1) if draw_greedy else torch.multinomial(q, 1, generator=gen).flatten()
        path, token = VERIFIERS[verifier](p, q, drafts, sampler)
        emitted = drafts[path].tolist() + [token]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
    return p, first, second


@pytest.mark.parametrize("verifier", VERIFIERS)
def test_chain_verification_is_exact(verifier):
    p, first, second = synthetic_round(draw_greedy=False, trials=20000, verifier=verifier)
    assert chi_square_pvalue(first, p[0]) > PASS_P
    # Given that the first draft was accepted, the next token is again target-distributed.
    assert chi_square_pvalue(second, p[1]) > PASS_P


@pytest.mark.parametrize("verifier", VERIFIERS)
def test_chain_verification_test_catches_greedy_drafts(verifier):
    p, first, _ = synthetic_round(draw_greedy=True, trials=20000, verifier=verifier)
    assert chi_square_pvalue(first, p[0]) < FAIL_P


VOCAB = 6
PROMPT = [1, 4, 3]


def exact_joint(model, length: int, prompt=PROMPT, **shaping) -> torch.Tensor:
    """The target's exact probability of every continuation of `length` tokens after `prompt`, [V]*length."""
    joint = torch.ones(1, dtype=torch.double)
    prefixes = [[]]
    for _ in range(length):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + c for c in prefixes])).logits[:, -1]
        step = reference_probs(logits, **shaping)
        joint = (joint[:, None] * step).flatten()
        prefixes = [c + [t] for c in prefixes for t in range(VOCAB)]
    return joint.reshape([VOCAB] * length)


def sample_counts(
    target, draft, samples: int, seed: int, method="speculative", options=None, tree=(3, 1), **shaping
) -> torch.Tensor:
    """Counts of the first three generated tokens.

    max_new_tokens=4: the first token comes from the prefill, the next from a round of two drafts
    (accept both + bonus, accept one + correction, or a correction at once) and, after a
    rejection, from the next round. With method="tree" the first round is a tree of shape `tree`
    (by default 3 siblings, each with one child); with method="saguaro" the next round's draft comes from
    the speculation cache on a hit.
    """
    counts = torch.zeros([VOCAB] * 3)
    torch.manual_seed(seed)
    with saguaro.SpeculativeGenerator(
        target,
        draft,
        method=method,
        num_speculative_tokens=2,
        speculation_schedule="constant",
        tree_branching=tree,
        **(options or {}),
    ) as generator:
        for _ in range(samples):
            out = generator.generate(
                torch.tensor([PROMPT]), max_new_tokens=4, do_sample=True, eos_token_id=[], **shaping
            )
            counts[tuple(out[0, len(PROMPT) : len(PROMPT) + 3].tolist())] += 1
    return counts


@pytest.fixture(scope="module")
def pair():
    # Large init scale: peaked, clearly different target and draft distributions, so drafts are
    # often rejected and the residual path carries real weight.
    target = tiny_model("llama", seed=0, vocab=VOCAB, layers=1, hidden=16, init=0.6)
    draft = tiny_model("llama", seed=5, vocab=VOCAB, layers=1, hidden=16, init=0.6)
    return target, draft


SHAPINGS = [dict(temperature=1.0), dict(temperature=0.7, top_k=3), dict(temperature=1.3, top_p=0.8)]


@pytest.mark.parametrize("shaping", SHAPINGS, ids=["temperature", "top_k", "top_p"])
def test_speculative_sampling_matches_target_distribution(pair, shaping):
    target, draft = pair
    counts = sample_counts(target, draft, samples=1500, seed=11, **shaping)
    assert chi_square_pvalue(counts, exact_joint(target, 3, **shaping)) > PASS_P


# compile=True: the same rounds through compiled steps on static caches (test_compile.py).
COMPILED = {"compile": True}


def test_compiled_speculative_sampling_matches_target_distribution(pair):
    target, draft = pair
    counts = sample_counts(target, draft, samples=1500, seed=12, options=COMPILED, temperature=0.8)
    assert chi_square_pvalue(counts, exact_joint(target, 3, temperature=0.8)) > PASS_P


@pytest.mark.parametrize("options", [None, COMPILED], ids=["eager", "compiled"])
def test_end_to_end_test_catches_draft_not_drawn_from_q(pair, monkeypatch, options):
    target, draft = pair
    real_propose = ModelDrafter.propose

    def greedy_draft_sampled_q(self, num_tokens):
        return argmax_with_sampled_q(real_propose(self, num_tokens))

    monkeypatch.setattr(ModelDrafter, "propose", greedy_draft_sampled_q)
    counts = sample_counts(target, draft, samples=1500, seed=11, options=options)
    assert chi_square_pvalue(counts, exact_joint(target, 3)) < FAIL_P


def synthetic_tree_round(keep_original_q: bool, trials: int, verifier: str, seed: int = 0):
    """Three root siblings drawn without replacement, each with one child; the target's distribution
    after token t is P2[t]. Returns p0, P2, counts of the first token, counts of (first, second)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = 5
    p0 = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
    P2 = torch.softmax(torch.randn(vocab, vocab, generator=gen) * 1.5, -1)
    q0 = torch.tensor([0.05, 0.15, 0.5, 0.1, 0.2])
    Q2 = torch.softmax(torch.randn(vocab, vocab, generator=gen) * 1.5, -1)
    tree = TokenTree((-1, -1, -1, 0, 1, 2))
    sampler = TokenSampler(SamplingConfig(do_sample=True), gen)
    first, pairs = torch.zeros(vocab), torch.zeros(vocab, vocab)
    for _ in range(trials):
        q, siblings, sibling_q = q0.clone(), [], []
        for _ in range(3):  # without replacement: each sibling from q minus the earlier ones
            x = int(torch.multinomial(q, 1, generator=gen))
            siblings.append(x)
            sibling_q.append(q0 if keep_original_q else q)
            q = q.clone()
            q[x] = 0
            q = q / q.sum()
        children = [int(torch.multinomial(Q2[x], 1, generator=gen)) for x in siblings]
        tokens = torch.tensor(siblings + children)
        draft_probs = torch.stack(sibling_q + [Q2[x] for x in siblings])
        target_probs = torch.stack([p0] + [P2[t] for t in tokens.tolist()])
        path, token = TREE_VERIFIERS[verifier](target_probs, draft_probs, tokens, tree, sampler)
        emitted = tokens[path].tolist() + [token]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            pairs[emitted[0], emitted[1]] += 1
    return p0, P2, first, pairs


@pytest.mark.parametrize("verifier", TREE_VERIFIERS)
def test_tree_verification_is_exact(verifier):
    p0, P2, first, pairs = synthetic_tree_round(keep_original_q=False, trials=20000, verifier=verifier)
    assert chi_square_pvalue(first, p0) > PASS_P
    for t in range(3):  # after an accepted first token t, the next is distributed as P2[t]
        assert chi_square_pvalue(pairs[t], P2[t]) > PASS_P


@pytest.mark.parametrize("verifier", TREE_VERIFIERS)
def test_tree_verification_test_catches_unrenormalised_sibling_q(verifier):
    p0, _, first, _ = synthetic_tree_round(keep_original_q=True, trials=20000, verifier=verifier)
    assert chi_square_pvalue(first, p0) < FAIL_P


@pytest.mark.parametrize(
    "tree", [[3, 1], saguaro.DynamicTree(depth=2, top_k=3, budget=4)], ids=["static", "dynamic"]
)
def test_tree_sampling_matches_target_distribution(pair, tree):
    # The dynamic tree keeps the likeliest sampled siblings, always a prefix of each node's draws.
    target, draft = pair
    shaping = dict(temperature=0.9, top_k=4)
    counts = sample_counts(target, draft, samples=1500, seed=12, method="tree", tree=tree, **shaping)
    assert chi_square_pvalue(counts, exact_joint(target, 3, **shaping)) > PASS_P


SAGUARO = dict(placement="process", saguaro_reshape=0.1, saguaro_budget=6)


@pytest.mark.timeout(300)
def test_saguaro_sampling_matches_target_distribution(pair):
    # C = 0.1 reshapes every draft distribution: still exact, because verification divides by the
    # reshaped q' the drafts were drawn from.
    target, draft = pair
    shaping = dict(temperature=1.0, top_p=0.9)
    counts = sample_counts(target, draft, samples=1500, seed=13, method="saguaro", options=SAGUARO, **shaping)
    assert chi_square_pvalue(counts, exact_joint(target, 3, **shaping)) > PASS_P


@pytest.mark.timeout(300)
def test_saguaro_test_catches_verifying_with_the_unreshaped_q(pair, monkeypatch):
    real_draw = PreSpeculator._draw

    def draw_reshaped_report_original(self, probs):
        tokens, _ = real_draw(self, probs)
        return tokens, None if self.sampler.greedy else probs

    monkeypatch.setattr(
        PreSpeculator, "_draw", draw_reshaped_report_original
    )  # fork carries it to the worker
    target, draft = pair
    counts = sample_counts(target, draft, samples=1500, seed=13, method="saguaro", options=SAGUARO)
    assert chi_square_pvalue(counts, exact_joint(target, 3)) < FAIL_P


def test_prompt_lookup_sampling_matches_target_distribution(pair):
    # Copied drafts are deterministic proposals, verified as q = one-hot(x).
    target, _ = pair
    counts = sample_counts(target, None, samples=1500, seed=14, method="prompt_lookup")
    assert chi_square_pvalue(counts, exact_joint(target, 3)) > PASS_P


def test_prompt_lookup_test_catches_argmax_style_verification(pair, monkeypatch):
    # Treating a copied token as if drawn from the uniform distribution is one way to get it wrong.
    monkeypatch.setattr(
        engines, "one_hot_probs", lambda tokens, width: torch.full((len(tokens), width), 1 / width)
    )
    target, _ = pair
    counts = sample_counts(target, None, samples=1500, seed=14, method="prompt_lookup")
    assert chi_square_pvalue(counts, exact_joint(target, 3)) < FAIL_P
