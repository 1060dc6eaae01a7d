"""Comparing two greedy decodes that are equal up to float rounding.

Random-weight models have near-flat distributions, so two computations of the same logits that differ
by ~1e-6 (another chunking of the prompt, say) can legitimately pick different tokens where the top two
are tied. The comparison allows a divergence only at such a tie, and checks logprobs everywhere before.
"""

from __future__ import annotations

from collections.abc import Sequence

from adapters.base import TokenEvent

Greedy = list[tuple[str, float, list[tuple[str, float]]]]

TOL = 1e-4


def assert_same_greedy(
    ref: list[tuple[str, float, list[tuple[str, float]]]], got: list[tuple[str, float, list[tuple[str, float]]]]
) -> None:
    """Each item: (token, logprob, [(top token, logprob), ...]) as in OpenAI's chat logprobs."""
    assert ref and got
    for i, ((tok_a, lp_a, top_a), (tok_b, lp_b, _)) in enumerate(zip(ref, got, strict=False)):
        if tok_a == tok_b:
            assert abs(lp_a - lp_b) < TOL, f"position {i}: logprobs {lp_a} vs {lp_b}"
            continue
        alternatives = dict(top_a)
        assert tok_b in alternatives and abs(alternatives[tok_b] - lp_a) < TOL, (
            f"position {i}: {tok_a!r} ({lp_a}) vs {tok_b!r}, which is not tied with it in {top_a}"
        )
        return  # the decodes legitimately part at a tie
    assert len(ref) == len(got)


def greedy_of(events: Sequence[object]) -> Greedy:
    """An engine run's tokens with their logprobs and top alternatives, as :func:`assert_same_greedy` takes them."""
    return [
        (lp.token, lp.logprob, [(t.token, t.logprob) for t in lp.top])
        for e in events
        if isinstance(e, TokenEvent)
        for lp in e.logprobs
    ]
