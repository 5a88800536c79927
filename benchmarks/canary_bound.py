"""The fewest ratings any canary test could decide in: Wald's SPRT told every version's approval rate.

`bench canary-replay --oracle` replays the drill with this rule in place of the product's judge. It is not
deployable (it knows what the judge must find out), so what it measures is a floor: on the same users at
the same exposure, no test with the same error rates can decide much sooner. The judge's distance above
it is the price of not knowing the rates (the mixture's regret, live's own interval, two tests sharing
alpha); a target below it cannot be met by any test.

The rates are the replay's: a thumb approves an answer of v with probability p_v, and a chooser shown one
answer of the canary c and one of live l picks the canary with probability

    w(p_c, p_l) = p_c (1 - p_l) + (p_c p_l + (1 - p_c)(1 - p_l)) / 2       (a coin between equals)

After S approvals in n canary thumbs and W wins in m comparisons, the log-likelihood ratio of the truth
(p_c, w) against a null (p0, w0) is

    Lambda(p0, w0) = S log(p_c / p0) + (n - S) log((1 - p_c) / (1 - p0))
                   + W log(w / w0) + (m - W) log((1 - w) / (1 - w0))

exp(Lambda) is a nonnegative martingale with mean 1 under the null, so by Ville's inequality
P(ever Lambda >= log(1/alpha)) <= alpha: the judge's per-kind guarantee, however often it looks.

    rollback   a canary with p_c < p_l, when Lambda(p_l, 1/2) >= log(1/alpha)     (null: as good as live)
    promote    any other, when Lambda(p_l - margin, w(p_l - margin, p_l)) >= log(1/alpha)
                                                                          (null: worse by the margin)

Knowing which side the canary is on, it tests only for the right decision, with one test and the whole
alpha (Wald 1945; among tests with these error rates the SPRT needs the fewest observations on average,
Wald and Wolfowitz 1948).
"""

from __future__ import annotations

import math

from benchmarks.canary_replay import Decide
from service.canary.ratings import VersionRatings
from service.canary.sequential import Verdict
from thumbtune.core.settings import Settings

EDGE = 1e-6
"""Rates are kept in [EDGE, 1 - EDGE]: a version never (or always) approved would make one outcome
infinitely telling."""


def win_probability(p_canary: float, p_live: float) -> float:
    """w(p_c, p_l): a chooser's chance of picking the canary's answer over live's."""
    return p_canary * (1 - p_live) + (p_canary * p_live + (1 - p_canary) * (1 - p_live)) / 2


def log_likelihood_ratio(
    approvals: int,
    thumbs: int,
    wins: int,
    comparisons: int,
    truth: tuple[float, float],
    null: tuple[float, float],
) -> float:
    """Lambda: the evidence for the true (p_c, w) against the null (p0, w0)."""
    (p, w), (p0, w0) = ([min(max(x, EDGE), 1 - EDGE) for x in pair] for pair in (truth, null))
    return (
        approvals * math.log(p / p0)
        + (thumbs - approvals) * math.log((1 - p) / (1 - p0))
        + wins * math.log(w / w0)
        + (comparisons - wins) * math.log((1 - w) / (1 - w0))
    )


def oracle(rates: dict[str, float]) -> Decide:
    """The SPRT as a decision rule for `canary_replay.canary_run`, knowing every version's rate."""

    def decide(
        ratings: VersionRatings, canary: str, live: str, since: float, settings: Settings, now: float
    ) -> Verdict:
        mine, h2h = ratings.approval(canary, since), ratings.head_to_head(canary, live)
        evidence = (mine.approvals, mine.ratings, h2h.wins, h2h.comparisons)
        p_c, p_l, margin = rates[canary], rates[live], settings.canary_margin
        truth = (p_c, win_probability(p_c, p_l))
        threshold = math.log(1 / settings.canary_alpha)
        if p_c < p_l:  # the alternative worse than live: only a rollback can be right
            null = (p_l, 0.5)
            verdict = Verdict.rollback
        else:
            worse = p_l - margin
            null = (worse, win_probability(worse, p_l))
            verdict = Verdict.promote
        if log_likelihood_ratio(*evidence, truth, null) >= threshold:
            return verdict
        return Verdict.undecided

    return decide
