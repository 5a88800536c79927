"""Anytime-valid sequential tests for canary decisions, as pure functions of counts.

A canary version serves a share of the traffic beside the live one. Each rating is an outcome X in [0, 1]:
approved (reward > 0) or not, or in head-to-head mode 1 (the canary won), 1/2 (tie) or 0. Operators look
after every rating, and a fixed-n interval that is checked again and again errs far more often than its
alpha (tests/unit/test_canary_sequential.py measures by how much). A confidence sequence (CS) is a
sequence of intervals C_n with

    P(for all n >= 0: mu in C_n) >= 1 - alpha,

so it may be read after every rating and acted on at any data-dependent time (Howard, Ramdas, McAuliffe,
Sekhon 2021, "Time-uniform, nonparametric, nonasymptotic confidence sequences", Ann. Statist. 49(2)).

The boundary is Howard et al.'s two-sided normal mixture (after Robbins 1970). By Hoeffding's lemma an X in
[0, 1] with mean mu is 1/2-sub-Gaussian, E exp(lam (X - mu)) <= exp(lam^2 sigma^2 / 2) with sigma^2 = 1/4,
so with S_n = sum_{i<=n} (X_i - mu) and V_n = n sigma^2

    L_n(lam) = exp(lam S_n - lam^2 V_n / 2)

is a nonnegative supermartingale for every lam. So is its mixture over lam ~ N(0, 1/rho) (Fubini):

    M_n = int L_n(lam) dN(0, 1/rho) = sqrt(rho / (V_n + rho)) exp(S_n^2 / (2 (V_n + rho))),   M_0 = 1,

and Ville's inequality gives P(exists n: M_n >= 1/alpha) <= alpha. Solving M_n >= 1/alpha for |S_n|:

    P(exists n: |S_n| >= u(V_n)) <= alpha,   u(v) = sqrt((v + rho) (2 log(1/alpha) + log((v + rho) / rho))).

The mixing density is symmetric in lam, so this one event covers both sides at level alpha: no alpha / 2
split (confseq's TwoSidedNormalMixture::bound is the same formula). After n observations summing to total,
the CS for mu is total/n -+ u(n/4) / n, intersected with [0, 1].

Why not an empirical-Bernstein variance (tighter for approval rates near 0 or 1): plugging the sample
variance into V_n is not covered by the argument above, and the valid constructions (Howard et al.'s
sub-exponential processes with predictable centres and the gamma-exponential mixture; Waudby-Smith and
Ramdas's betting CSs) are more machinery than a canary needs; near p = 1/2 they would gain little.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np

SIGMA2 = 0.25
"""Variance proxy of an observation in [0, 1] (Hoeffding's lemma): V_n = n SIGMA2 is the intrinsic time."""

TIGHTEST_AT = 100
"""Ratings per version at which the default boundary is tightest. A canary serving 10% of users has ~100
of its own within its first ~1,000 ratings, where decisions should fall; the price later is small (at
alpha = 0.0125, the radius at n = 36 is 0.31 instead of 0.42 with the boundary tightest at 500, and at
n = 500 it is 0.080 instead of 0.079)."""


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha is an error probability and must be in (0, 1), got {alpha}")


def rho_tightest_at(n: float, alpha: float = 0.05) -> float:
    """The mixture precision rho that (approximately) minimises u(V) at V* = n SIGMA2.

    d u^2 / d rho = 0 gives x - log(1 + x) = 2 log(1/alpha) with x = V* / rho; its closed-form approximate
    root, as Howard et al.'s library confseq takes it (TwoSidedNormalMixture::best_rho):

        rho = V* / (2 log(1/alpha) + log(1 + 2 log(1/alpha)))

    A smaller rho is tighter early and looser late; away from n the boundary pays only a slowly growing log.
    """
    _check_alpha(alpha)
    two_log = 2 * math.log(1 / alpha)
    return n * SIGMA2 / (two_log + math.log1p(two_log))


RHO = rho_tightest_at(TIGHTEST_AT, 0.05)
"""The mixture's precision (about 3.15): it tunes the n at which the CS is tightest (`TIGHTEST_AT`)."""


def mixture_boundary(v: float | np.ndarray, alpha: float, rho: float = RHO) -> float | np.ndarray:
    """u(v) = sqrt((v + rho) (2 log(1/alpha) + log(1 + v / rho))): |S_n| crosses u(V_n) with prob. <= alpha.

    Elementwise on arrays, so a simulation can evaluate a whole [streams, steps] grid at once.
    """
    return np.sqrt((v + rho) * (2 * np.log(1 / alpha) + np.log1p(v / rho)))


@dataclass(frozen=True)
class Interval:
    """A point estimate and its anytime-valid bounds, clipped to the parameter's range."""

    estimate: float
    """The sample mean (or difference of means); nan before the first observation."""
    lower: float
    upper: float


def mean_cs(total: float, n: int, alpha: float, rho: float = RHO) -> Interval:
    """A (1 - alpha) time-uniform CS for the mean of i.i.d. observations in [0, 1], after n summing to total.

        mu in [total/n - u(n/4)/n, total/n + u(n/4)/n] ∩ [0, 1]   for all n at once, w.p. >= 1 - alpha

    n = 0 is the whole range [0, 1].
    """
    _check_alpha(alpha)
    _check_counts(total, n)
    if rho <= 0:
        raise ValueError(f"rho is the mixture's precision and must be > 0, got {rho}")
    if n == 0:
        return Interval(estimate=math.nan, lower=0.0, upper=1.0)
    mean = total / n
    radius = float(mixture_boundary(n * SIGMA2, alpha, rho)) / n
    return Interval(estimate=mean, lower=max(0.0, mean - radius), upper=min(1.0, mean + radius))


def difference_cs(
    a_total: float, a_n: int, b_total: float, b_n: int, alpha: float, rho: float = RHO
) -> Interval:
    """A (1 - alpha) time-uniform CS for mu_a - mu_b in [-1, 1], by a union bound over two CSs at alpha / 2.

        P(exists n_a: mu_a not in A_{n_a}) <= alpha/2 and P(exists n_b: mu_b not in B_{n_b}) <= alpha/2, so
        w.p. >= 1 - alpha, for all (n_a, n_b) at once: mu_a - mu_b in [A.lower - B.upper, A.upper - B.lower]

    Valid however the traffic is split between the two, as long as the split does not look at the ratings.
    """
    a = mean_cs(a_total, a_n, alpha / 2, rho)
    b = mean_cs(b_total, b_n, alpha / 2, rho)
    return Interval(estimate=a.estimate - b.estimate, lower=a.lower - b.upper, upper=a.upper - b.lower)


def win_rate_cs(wins: float, n: int, alpha: float, rho: float = RHO) -> Interval:
    """A (1 - alpha) time-uniform CS for a head-to-head win probability (ties count 1/2): `mean_cs`."""
    return mean_cs(wins, n, alpha, rho)


class Verdict(str, Enum):
    promote = "promote"
    rollback = "rollback"
    undecided = "undecided"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    interval: Interval
    reason: str
    """For people: the figures, the interval and the threshold it cleared (or did not)."""


def decide_approval(
    canary_approvals: float,
    canary_ratings: int,
    live_approvals: float,
    live_ratings: int,
    *,
    margin: float,
    alpha: float,
) -> Decision:
    """Promote, roll back or wait, from the CS for Delta = p_canary - p_live (`difference_cs`).

        rollback   if upper < 0             (the canary is confidently worse)
        promote    if lower > -margin       (confidently not worse than live by more than the margin)
        undecided  otherwise; if both hold (the CS inside (-margin, 0)), rollback wins

    On the event that the CS covers Delta at every n (probability >= 1 - alpha), a canary with Delta >= 0
    has upper >= 0 and one with Delta < -margin has lower < -margin, so, however often it is consulted:

        P(ever roll back a canary at least as good as live)              <= alpha
        P(ever promote a canary worse than live by more than the margin) <= alpha
    """
    _check_margin(margin)
    cs = difference_cs(canary_approvals, canary_ratings, live_approvals, live_ratings, alpha)
    canary = mean_cs(canary_approvals, canary_ratings, alpha).estimate
    live = mean_cs(live_approvals, live_ratings, alpha).estimate
    figures = (
        f"approval canary {_fmt(canary)} ({canary_ratings} ratings) vs live {_fmt(live)} ({live_ratings}): "
        f"difference {_fmt(cs.estimate, '+.2f')}, {_level(alpha)} anytime CS [{cs.lower:.3f}, {cs.upper:.3f}]"
    )
    return _decide(cs, figures, worse_than=0.0, margin=margin)


def decide_head_to_head(canary_wins: float, comparisons: int, *, margin: float, alpha: float) -> Decision:
    """Promote, roll back or wait, from the CS for the canary's win rate q against live (ties count 1/2).

        rollback   if upper < 1/2
        promote    if lower > 1/2 - margin
        undecided  otherwise; rollback wins if both hold

    with the guarantees of `decide_approval`: P(ever roll back a canary with q >= 1/2) <= alpha and
    P(ever promote one with q < 1/2 - margin) <= alpha.
    """
    _check_margin(margin)
    cs = win_rate_cs(canary_wins, comparisons, alpha)
    figures = (
        f"head-to-head canary won {canary_wins:g} of {comparisons} comparisons (ties count 1/2): "
        f"win rate {_fmt(cs.estimate)}, {_level(alpha)} anytime CS [{cs.lower:.3f}, {cs.upper:.3f}]"
    )
    return _decide(cs, figures, worse_than=0.5, margin=margin)


def _decide(cs: Interval, figures: str, *, worse_than: float, margin: float) -> Decision:
    """`decide_approval`'s rule on a threshold t: rollback if upper < t, promote if lower > t - margin."""
    floor = worse_than - margin
    if cs.upper < worse_than:
        return Decision(Verdict.rollback, cs, f"{figures} < {worse_than:g}: the canary is worse, roll back")
    if cs.lower > floor:
        reason = f"{figures} > {floor:g}: the canary is not worse by more than the margin {margin:g}, promote"
        return Decision(Verdict.promote, cs, reason)
    reason = f"{figures} reaches both {floor:g} and {worse_than:g}: undecided, more ratings needed"
    return Decision(Verdict.undecided, cs, reason)


def _fmt(x: float, spec: str = ".2f") -> str:
    return "n/a" if math.isnan(x) else format(x, spec)


def _level(alpha: float) -> str:
    return f"{100 * (1 - alpha):g}%"


def _check_counts(total: float, n: int) -> None:
    if n < 0 or not 0 <= total <= n:
        raise ValueError(f"need 0 <= total <= n for n observations in [0, 1], got total={total}, n={n}")


def _check_margin(margin: float) -> None:
    if not 0 <= margin < 1:
        raise ValueError(f"margin (how much worse than live is acceptable) must be in [0, 1), got {margin}")
