"""Chi-square goodness of fit, for the distribution-exactness tests."""

import dataclasses

import torch


def chi_square_pvalue(
    observed: torch.Tensor, expected_probs: torch.Tensor, min_expected: float = 5.0
) -> float:
    """P-value of observed counts against exact probabilities.

    Cells whose expected count is below `min_expected` are pooled into one, the usual condition for
    the chi-square approximation to hold. A cell with expected 0 but observed > 0 is an impossible
    outcome: the p-value is 0.
    """
    observed = observed.double().flatten()
    expected = expected_probs.double().flatten() * observed.sum()
    if bool(((expected == 0) & (observed > 0)).any()):
        return 0.0
    small = expected < min_expected
    obs = torch.cat([observed[~small], observed[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    statistic = ((obs - exp) ** 2 / exp).sum()
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.double), statistic / 2))


def reference_probs(logits: torch.Tensor, temperature=1.0, top_k=None, top_p=None) -> torch.Tensor:
    """Temperature, then top-k, then top-p, written out plainly (independent of saguaro.decode.sampling)."""
    logits = logits.double() / temperature
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if top_p is not None and top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= top_p  # keep the smallest head whose mass reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def argmax_with_sampled_q(draft):
    """The planted sampling bug (HF #47932): report the q the drafts should be drawn from, but
    propose its argmax. A chi-square test that cannot see this is not testing exactness."""
    if draft.probs is None or not len(draft.tokens):
        return draft
    return dataclasses.replace(draft, tokens=draft.probs.argmax(-1).tolist())
