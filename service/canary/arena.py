"""Bradley-Terry ratings of versions from head-to-head comparisons on the Elo scale, with bootstrap intervals.

What Chatbot Arena computes (FastChat, fastchat/serve/monitor/elo_analysis.py: `compute_elo_mle_with_tie`
and `get_bootstrap_result`; Chiang et al. 2024), without sklearn. The model (Bradley and Terry 1952):

    P(i beats j) = 1 / (1 + BASE^((R_j - R_i) / SCALE)) = sigmoid(theta_i - theta_j),
    theta_i = ln(BASE) (R_i - INIT) / SCALE                  (ratings in natural log-odds units)

A tie counts as half a win each way (Chatbot Arena duplicates rows to the same effect). With W_ij the wins
of i over j (a tie adds 1/2 to W_ij and to W_ji), N_ij = W_ij + W_ji and p_ij = sigmoid(theta_i - theta_j),
the fit maximises the penalised log-likelihood over the K versions connected to the anchor

    f(theta) = sum_{i != j} W_ij log p_ij - (lambda / 2) sum_i (theta_i - mean(theta))^2,

with theta_anchor = 0 held fixed (Chatbot Arena fixes mixtral at 1114 after the fit; we fix the version
the caller names, normally the live one, at INIT). The penalty is a weak Gaussian prior toward equal ratings,
precision lambda = PRIOR_PRECISION on each version's deviation from the mean: it keeps a version that won
every comparison finite and barely moves the others (30 wins to 10 by under 1 Elo). f is strictly concave
on theta_anchor = 0, so Newton's method, with step halving for safety, finds its maximum:

    g_i  = sum_j (W_ij - N_ij p_ij) - lambda (theta_i - mean(theta))
    H_ij = N_ij p_ij p_ji + lambda / K  (i != j),   H_ii = -sum_{j != i} N_ij p_ij p_ji - lambda (1 - 1/K)
    theta <- theta - H^-1 g    (over the versions other than the anchor)

A version with no chain of comparisons to the anchor has no rating relative to it (only the prior would
place it): it is left out of the result. An anchor in no comparison is a ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SCALE = 400.0
BASE = 10.0
INIT = 1000.0
"""Chatbot Arena's (and chess's) Elo conventions: 400 points is a factor of 10 in the odds of winning."""

PRIOR_PRECISION = 0.03
"""lambda, per squared log-odds unit: sd 1 / sqrt(lambda) = 5.8 log-odds, about 1000 Elo. Weak."""

NEWTON_STEPS = 100
NEWTON_TOLERANCE = 1e-10
"""Newton stops when no rating moves by more than this many log-odds units (about 2e-8 Elo)."""


@dataclass(frozen=True)
class Comparison:
    """One head-to-head comparison: ``winner`` beat ``loser``, or with ``tie`` the two drew (either order)."""

    winner: str
    loser: str
    tie: bool = False

    def __post_init__(self) -> None:
        if self.winner == self.loser:
            raise ValueError(f"a comparison needs two different versions, got {self.winner!r} twice")


def fit_ratings(
    comparisons: Sequence[Comparison],
    anchor: str,
    *,
    scale: float = SCALE,
    base: float = BASE,
    init: float = INIT,
) -> dict[str, float]:
    """Maximum-a-posteriori Bradley-Terry ratings, R_i = init + scale theta_i / ln(base); R_anchor = init.

    Versions with no chain of comparisons to the anchor are left out.
    """
    versions, winner, loser, tie = _encode(comparisons, anchor)
    wins = _wins(winner, loser, tie, len(versions), np.ones(len(winner)))
    rated, theta = _fit(wins, versions.index(anchor))
    return {versions[i]: init + scale * float(t) / math.log(base) for i, t in zip(rated, theta, strict=True)}


def bootstrap_intervals(
    comparisons: Sequence[Comparison],
    anchor: str,
    *,
    rounds: int = 100,
    confidence: float = 0.95,
    seed: int = 0,
    scale: float = SCALE,
    base: float = BASE,
    init: float = INIT,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of `fit_ratings`, as Chatbot Arena's `get_bootstrap_result`.

    Each of ``rounds`` rounds resamples the comparisons with replacement (as many as there are) and refits;
    a version's interval is the (1 - confidence)/2 and (1 + confidence)/2 quantiles of its refitted ratings
    (0.025 and 0.975 by default), over the rounds in which it was still connected to the anchor. The keys are
    those of `fit_ratings` on all the comparisons; the anchor's interval is (init, init).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    versions, winner, loser, tie = _encode(comparisons, anchor)
    k, m, a = len(versions), len(winner), versions.index(anchor)
    rng = np.random.default_rng(seed)
    samples = np.full((rounds, k), np.nan)
    for r in range(rounds):
        counts = np.bincount(rng.integers(0, m, size=m), minlength=m).astype(float)
        rated, theta = _fit(_wins(winner, loser, tie, k, counts), a)
        samples[r, rated] = init + scale * theta / math.log(base)
    quantiles = [(1 - confidence) / 2, (1 + confidence) / 2]
    intervals = {}
    for name in fit_ratings(comparisons, anchor, scale=scale, base=base, init=init):
        column = samples[:, versions.index(name)]
        column = column[~np.isnan(column)]
        low, high = np.quantile(column, quantiles) if len(column) else (math.nan, math.nan)
        intervals[name] = (float(low), float(high))
    return intervals


def _encode(
    comparisons: Sequence[Comparison], anchor: str
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Versions in order of first appearance, and each comparison's (winner, loser, tie) as index arrays."""
    versions = list(dict.fromkeys(name for c in comparisons for name in (c.winner, c.loser)))
    if anchor not in versions:
        raise ValueError(
            f"the anchor {anchor!r} is in no comparison, and ratings are relative to it: "
            "anchor a version that has been compared (the live one)"
        )
    index = {name: i for i, name in enumerate(versions)}
    winner = np.array([index[c.winner] for c in comparisons], dtype=np.int64)
    loser = np.array([index[c.loser] for c in comparisons], dtype=np.int64)
    tie = np.array([c.tie for c in comparisons], dtype=bool)
    return versions, winner, loser, tie


def _wins(winner: np.ndarray, loser: np.ndarray, tie: np.ndarray, k: int, counts: np.ndarray) -> np.ndarray:
    """W [k, k]: W_ij = wins of i over j, a tie giving 1/2 to each side; ``counts`` weighs each comparison."""
    forward = np.where(tie, 0.5, 1.0) * counts
    backward = np.where(tie, 0.5, 0.0) * counts
    flat = np.bincount(winner * k + loser, weights=forward, minlength=k * k)
    flat += np.bincount(loser * k + winner, weights=backward, minlength=k * k)
    return flat.reshape(k, k)


def _connected(played: np.ndarray, start: int) -> np.ndarray:
    """Indices reachable from ``start`` along pairs with played[i, j] > 0, in increasing order."""
    seen = np.zeros(len(played), dtype=bool)
    seen[start] = True
    frontier = [start]
    while frontier:
        reached = (played[frontier] > 0).any(axis=0) & ~seen
        seen |= reached
        frontier = list(np.flatnonzero(reached))
    return np.flatnonzero(seen)


def _fit(wins: np.ndarray, anchor: int) -> tuple[np.ndarray, np.ndarray]:
    """(rated indices, their theta): Newton on f over the anchor's component, theta_anchor = 0."""
    rated = _connected(wins + wins.T, anchor)
    w = wins[np.ix_(rated, rated)]
    n = w + w.T
    k = len(rated)
    free = rated != anchor
    centre = np.eye(k) - 1.0 / k
    theta = np.zeros(k)
    if k == 1:
        return rated, theta
    value = _objective(theta, w, centre)
    for _ in range(NEWTON_STEPS):
        p = _sigmoid(theta[:, None] - theta[None, :])
        grad = (w - n * p).sum(axis=1) - PRIOR_PRECISION * centre @ theta
        curvature = n * p * p.T
        hess = curvature - np.diag(curvature.sum(axis=1)) - PRIOR_PRECISION * centre
        step = np.linalg.solve(hess[np.ix_(free, free)], -grad[free])
        t = 1.0
        while True:
            candidate = theta.copy()
            candidate[free] += t * step
            new_value = _objective(candidate, w, centre)
            if new_value >= value or t < 1e-6:
                break
            t /= 2
        theta, value = candidate, new_value
        if np.max(np.abs(t * step)) < NEWTON_TOLERANCE:
            break
    return rated, theta


def _objective(theta: np.ndarray, w: np.ndarray, centre: np.ndarray) -> float:
    """f(theta) = sum W_ij log sigmoid(theta_i - theta_j) - (lambda / 2) theta' C theta, C = I - 11'/K."""
    log_p = -np.logaddexp(0.0, theta[None, :] - theta[:, None])
    return float((w * log_p).sum() - 0.5 * PRIOR_PRECISION * theta @ centre @ theta)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-x), without overflow warnings for large |x|."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))
