"""service/canary/arena.py against closed forms, a direct solve of the Bradley-Terry likelihood equations,
and the properties of its bootstrap intervals."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from service.canary.arena import INIT, Comparison, bootstrap_intervals, fit_ratings

PRIOR_TOLERANCE = 1.0
"""Elo: how far the weak prior may move a fit from the plain maximum likelihood on these small data sets."""


def games(winner: str, loser: str, wins: int, losses: int = 0, ties: int = 0) -> list[Comparison]:
    return (
        [Comparison(winner, loser)] * wins
        + [Comparison(loser, winner)] * losses
        + [Comparison(winner, loser, tie=True)] * ties
    )


def bradley_terry_mle(comparisons: list[Comparison], anchor: str, steps: int = 20000) -> dict[str, float]:
    """Unpenalised MLE by Hunter's (2004) MM iteration on the likelihood equations

        W_i = sum_j N_ij pi_i / (pi_i + pi_j)   =>   pi_i <- W_i / sum_j N_ij / (pi_i + pi_j),

    with R_i = INIT + 400 log10(pi_i / pi_anchor). W_i counts a tie as half a win for each side."""
    names = sorted({n for c in comparisons for n in (c.winner, c.loser)})
    k, index = len(names), {n: i for i, n in enumerate(names)}
    w = np.zeros((k, k))
    for c in comparisons:
        i, j = index[c.winner], index[c.loser]
        if c.tie:
            w[i, j] += 0.5
            w[j, i] += 0.5
        else:
            w[i, j] += 1
    n = w + w.T
    pi = np.ones(k)
    for _ in range(steps):
        pi = w.sum(axis=1) / (n / (pi[:, None] + pi[None, :])).sum(axis=1)
        pi /= pi.sum()
    return {name: INIT + 400 * math.log10(pi[i] / pi[index[anchor]]) for name, i in index.items()}


def test_two_versions_are_the_closed_form_gap_within_what_the_prior_moves() -> None:
    ratings = fit_ratings(games("live", "canary", 30, 10), anchor="live")
    closed_form = 400 * math.log10(30 / 10)  # = 190.85: P(live beats canary) = 3/4
    gap = ratings["live"] - ratings["canary"]
    assert ratings["live"] == INIT
    assert 0 < closed_form - gap < PRIOR_TOLERANCE, f"gap {gap:.3f} vs closed form {closed_form:.3f}"


def test_the_anchor_is_exactly_init_and_the_rest_move_with_it() -> None:
    comparisons = games("a", "b", 12, 8) + games("b", "c", 9, 11)
    from_a = fit_ratings(comparisons, anchor="a", init=1114.0)
    from_c = fit_ratings(comparisons, anchor="c")
    assert from_a["a"] == 1114.0 and from_c["c"] == INIT
    for name in "abc":
        assert from_a[name] - from_a["a"] == pytest.approx(from_c[name] - from_c["a"], abs=1e-6)


def test_a_symmetric_cycle_gives_equal_ratings() -> None:
    comparisons = games("a", "b", 10, 5) + games("b", "c", 10, 5) + games("c", "a", 10, 5)
    ratings = fit_ratings(comparisons, anchor="a")
    assert ratings == pytest.approx({"a": INIT, "b": INIT, "c": INIT}, abs=1e-9)


def test_a_chain_with_no_direct_games_adds_its_gaps() -> None:
    ratings = fit_ratings(games("a", "b", 20, 10) + games("b", "c", 20, 10), anchor="b")
    step = 400 * math.log10(2)  # = 120.41 for each 20-10 link
    assert ratings["a"] - ratings["b"] == pytest.approx(step, abs=PRIOR_TOLERANCE)
    assert ratings["b"] - ratings["c"] == pytest.approx(step, abs=PRIOR_TOLERANCE)


def test_three_versions_solve_the_bradley_terry_likelihood_equations() -> None:
    comparisons = games("a", "b", 20, 10, ties=4) + games("b", "c", 15, 12) + games("a", "c", 7, 5, ties=2)
    ratings = fit_ratings(comparisons, anchor="c")
    assert ratings == pytest.approx(bradley_terry_mle(comparisons, anchor="c"), abs=PRIOR_TOLERANCE)


def test_a_tie_counts_as_half_a_win_each_way() -> None:
    with_ties = fit_ratings(games("a", "b", 10, ties=10), anchor="a")
    as_wins = fit_ratings(games("a", "b", 15, 5), anchor="a")
    assert with_ties == pytest.approx(as_wins, abs=1e-9)
    assert fit_ratings(games("a", "b", 0, ties=7), anchor="b") == pytest.approx({"a": INIT, "b": INIT})


def test_a_version_that_won_everything_gets_a_finite_rating() -> None:
    ratings = fit_ratings(games("canary", "live", 20), anchor="live")
    assert math.isfinite(ratings["canary"])
    assert ratings["canary"] - ratings["live"] > 400


def test_the_fit_reproduces_chatbot_arenas_win_probability() -> None:
    ratings = fit_ratings(games("a", "b", 60, 20), anchor="b")
    p = 1 / (1 + 10 ** ((ratings["b"] - ratings["a"]) / 400))
    assert p == pytest.approx(0.75, abs=0.001)


def test_a_version_with_no_path_to_the_anchor_is_left_out() -> None:
    comparisons = games("live", "v1", 5, 5) + games("v2", "v3", 6, 2)
    assert set(fit_ratings(comparisons, anchor="live")) == {"live", "v1"}
    assert set(bootstrap_intervals(comparisons, anchor="live", rounds=20)) == {"live", "v1"}


def test_an_anchor_in_no_comparison_is_refused() -> None:
    with pytest.raises(ValueError, match="'live' is in no comparison"):
        fit_ratings(games("v1", "v2", 3, 1), anchor="live")


def test_a_comparison_of_a_version_with_itself_is_refused() -> None:
    with pytest.raises(ValueError, match="two different versions"):
        Comparison("v1", "v1")


def test_bootstrap_intervals_contain_the_fit_and_the_anchor_is_pinned() -> None:
    comparisons = games("a", "b", 30, 18, ties=6) + games("b", "c", 25, 20) + games("a", "c", 12, 9)
    ratings = fit_ratings(comparisons, anchor="a")
    intervals = bootstrap_intervals(comparisons, anchor="a")
    assert intervals["a"] == (INIT, INIT)
    for name, (low, high) in intervals.items():
        assert low <= ratings[name] <= high, (name, low, ratings[name], high)


def test_bootstrap_is_reproducible_with_its_seed() -> None:
    comparisons = games("a", "b", 30, 18) + games("b", "c", 25, 20)
    assert bootstrap_intervals(comparisons, "a", seed=3) == bootstrap_intervals(comparisons, "a", seed=3)
    assert bootstrap_intervals(comparisons, "a", seed=3) != bootstrap_intervals(comparisons, "a", seed=4)


def test_bootstrap_intervals_narrow_as_data_grows() -> None:
    small = bootstrap_intervals(games("a", "b", 30, 10), anchor="a")["b"]
    large = bootstrap_intervals(games("a", "b", 300, 100), anchor="a")["b"]
    assert (large[1] - large[0]) < (small[1] - small[0]) / 2, (small, large)


def test_a_fit_of_hundreds_of_comparisons_takes_well_under_ten_milliseconds() -> None:
    rng = np.random.default_rng(0)
    versions = ["v0", "v1", "v2", "v3", "v4"]
    pairs = [rng.choice(versions, size=2, replace=False) for _ in range(500)]
    comparisons = [Comparison(str(w), str(lo), tie=bool(rng.random() < 0.1)) for w, lo in pairs]
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        fit_ratings(comparisons, anchor="v0")
        best = min(best, time.perf_counter() - start)
    assert best < 0.010, f"a fit took {best * 1e3:.1f} ms"
