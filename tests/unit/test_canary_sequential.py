"""service/canary/sequential.py: the error rates under continuous monitoring (simulated, vectorised over
[streams, steps] arrays), the power against planted bad and good canaries, and hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.canary.sequential import (
    Verdict,
    cs_bounds,
    decide_approval,
    decide_head_to_head,
    difference_cs,
    log_mixture,
    mean_cs,
    win_rate_cs,
)

ALPHA = 0.05
STREAMS = 400
STEPS = 3000


def slack(streams: int = STREAMS, alpha: float = ALPHA) -> float:
    """alpha + 2 standard errors of a rate measured on ``streams`` Bernoulli(alpha) streams: a procedure whose
    true error rate is alpha exceeds it in ~2.5% of seeds; the seeds are fixed, so a pass is no fluke."""
    return alpha + 2 * math.sqrt(alpha * (1 - alpha) / streams)


def approval_streams(
    seed: int, streams: int, steps: int, share: float | np.ndarray, p_canary: float, p_live: float
) -> tuple[np.ndarray, ...]:
    """Cumulative (canary approvals, canary ratings, live approvals, live ratings) after every rating."""
    rng = np.random.default_rng(seed)
    share = np.broadcast_to(np.asarray(share, dtype=float).reshape(-1, 1), (streams, 1))
    to_canary = rng.random((streams, steps)) < share
    approved = rng.random((streams, steps)) < np.where(to_canary, p_canary, p_live)
    return (
        (approved & to_canary).cumsum(axis=1),
        to_canary.cumsum(axis=1),
        (approved & ~to_canary).cumsum(axis=1),
        (~to_canary).cumsum(axis=1),
    )


def difference_bounds(ca, cn, la, ln, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """`difference_cs`'s bounds on p_canary - p_live, elementwise: two CSs at alpha / 2."""
    c_low, c_high = cs_bounds(ca, cn, alpha / 2)
    l_low, l_high = cs_bounds(la, ln, alpha / 2)
    return c_low - l_high, c_high - l_low


def verdicts(lower: np.ndarray, upper: np.ndarray, worse_than: float, margin: float) -> np.ndarray:
    return np.where(
        upper < worse_than, "rollback", np.where(lower > worse_than - margin, "promote", "undecided")
    )


@pytest.mark.parametrize("p", [0.3, 0.5, 0.8])
def test_an_equal_canary_is_rolled_back_in_at_most_alpha_of_streams_watched_after_every_rating(
    p: float,
) -> None:
    rng = np.random.default_rng(int(p * 10))
    share = rng.uniform(0.1, 0.3, size=STREAMS)
    _, upper = difference_bounds(*approval_streams(int(p * 100), STREAMS, STEPS, share, p, p))
    rate = (upper < 0).any(axis=1).mean()
    assert rate <= slack(), f"A/A at p={p}: rolled back in {rate:.4f} of {STREAMS} streams"


def test_a_canary_worse_by_exactly_the_margin_is_promoted_in_at_most_alpha_of_streams() -> None:
    lower, _ = difference_bounds(*approval_streams(7, STREAMS, STEPS, 0.5, 0.4, 0.5))
    rate = (lower > -0.1).any(axis=1).mean()
    assert rate <= slack(), f"canary 0.4 vs live 0.5, margin 0.1: promoted in {rate:.4f} of {STREAMS} streams"


def head_to_head_streams(seed: int, streams: int, steps: int, p_win: float, p_tie: float) -> np.ndarray:
    """Cumulative canary wins after every comparison: 1 a win, 1/2 a tie, 0 a loss."""
    u = np.random.default_rng(seed).random((streams, steps))
    return np.where(u < p_win, 1.0, np.where(u < p_win + p_tie, 0.5, 0.0)).cumsum(axis=1)


def test_a_fair_head_to_head_is_rolled_back_in_at_most_alpha_of_streams_watched_after_every_comparison() -> (
    None
):
    wins = head_to_head_streams(11, STREAMS, STEPS, p_win=0.4, p_tie=0.2)
    _, upper = cs_bounds(wins, np.arange(1, STEPS + 1), ALPHA)
    rate = (upper < 0.5).any(axis=1).mean()
    assert rate <= slack(), f"fair coin (20% ties): rolled back in {rate:.4f} of {STREAMS} streams"


def test_a_head_to_head_loser_by_exactly_the_margin_is_promoted_in_at_most_alpha_of_streams() -> None:
    wins = head_to_head_streams(12, STREAMS, STEPS, p_win=0.45, p_tie=0.0)
    lower, _ = cs_bounds(wins, np.arange(1, STEPS + 1), ALPHA)
    rate = (lower > 0.45).any(axis=1).mean()
    assert rate <= slack(), f"win rate 0.45, margin 0.05: promoted in {rate:.4f} of {STREAMS} streams"


def test_the_simulation_catches_a_fixed_n_interval_checked_after_every_rating() -> None:
    """The harness has teeth: a 95% Wald interval, valid at one fixed n, is 'confidently worse' far too often
    when it is read after every rating (the reason for confidence sequences)."""
    ca, cn, la, ln = approval_streams(13, STREAMS, STEPS, 0.3, 0.5, 0.5)
    with np.errstate(divide="ignore", invalid="ignore"):
        pc, pl = ca / cn, la / ln
        wald = 1.96 * np.sqrt(pc * (1 - pc) / cn + pl * (1 - pl) / ln)
        rolled_back = ((pc - pl + wald < 0) & (cn >= 10) & (ln >= 10)).any(axis=1).mean()
    assert rolled_back > 4 * ALPHA, f"the Wald interval rolled back only {rolled_back:.3f} of A/A streams"


def test_a_bad_canary_is_rolled_back_within_a_few_hundred_ratings() -> None:
    _, upper = difference_bounds(*approval_streams(21, 200, 400, 0.5, 0.1, 0.7))
    rolled_back = (upper < 0).any(axis=1)
    first = np.argmax(upper < 0, axis=1) + 1
    assert rolled_back.mean() >= 0.99, (
        f"approval 0.1 vs 0.7: rolled back in {rolled_back.mean():.3f} of streams"
    )
    assert np.median(first[rolled_back]) <= 200, f"median ratings before rollback {np.median(first)}"


@pytest.mark.parametrize(("p_canary", "margin", "steps"), [(0.85, 0.05, 2000), (0.7, 0.1, 5000)])
def test_a_good_canary_is_promoted_and_never_rolled_back(p_canary: float, margin: float, steps: int) -> None:
    lower, upper = difference_bounds(*approval_streams(22, 200, steps, 0.5, p_canary, 0.7))
    promoted = (lower > -margin).any(axis=1).mean()
    assert promoted >= 0.95, (
        f"canary {p_canary} vs 0.7, margin {margin}: promoted in {promoted:.3f} of streams"
    )
    assert not (upper < 0).any(), f"canary {p_canary} vs 0.7 was rolled back"


def test_the_vectorised_rule_is_decide_approval() -> None:
    """The simulations above use `cs_bounds`; here it agrees with the real rule at every step of a few
    streams that get rolled back, promoted, or neither."""
    for p_canary, margin in [(0.1, 0.05), (0.85, 0.05), (0.7, 0.0)]:
        ca, cn, la, ln = approval_streams(31, 2, 600, 0.4, p_canary, 0.7)
        lower, upper = difference_bounds(ca, cn, la, ln)
        expected = verdicts(lower, upper, worse_than=0.0, margin=margin)
        for s in range(2):
            for t in range(0, 600, 7):
                decision = decide_approval(
                    int(ca[s, t]), int(cn[s, t]), int(la[s, t]), int(ln[s, t]), margin=margin, alpha=ALPHA
                )
                assert decision.verdict.value == expected[s, t], (p_canary, s, t, decision.reason)
                assert decision.interval.upper == pytest.approx(upper[s, t], abs=1e-12)


def test_mean_cs_is_the_beta_binomial_mixture_boundary_by_hand() -> None:
    # 0 approvals of n = 10, uniform prior, alpha 0.05: M(p) = B(1, 11) / (1 - p)^10 = 1 / (11 (1 - p)^10)
    # M(p) >= 20  <=>  (1 - p)^10 <= 1/220  <=>  p >= 1 - 220^(-1/10) = 1 - exp(-5.393628 / 10) = 0.416880
    none = mean_cs(0, 10, 0.05)
    assert (none.estimate, none.lower) == (0.0, 0.0)
    assert none.upper == pytest.approx(1 - 220 ** (-1 / 10), abs=1e-9)
    assert none.upper == pytest.approx(0.416880, abs=1e-6)
    every = mean_cs(10, 10, 0.05)  # the mirror image
    assert (every.lower, every.upper) == (pytest.approx(1 - 0.416880, abs=1e-6), 1.0)
    # the drill's seed 2: 1 win in 18 comparisons at alpha 0.025. B(2, 18) = 1! 17! / 19! = 1/342, so
    # M(p) = 1 / (342 p (1 - p)^17) >= 40  <=>  p (1 - p)^17 <= 1/13680 = 7.3099e-5, first at p = 0.39702
    won = mean_cs(1, 18, 0.025)
    assert won.upper == pytest.approx(0.39702, abs=1e-5)
    assert won.upper * (1 - won.upper) ** 17 == pytest.approx(1 / 13680, rel=1e-6)
    assert decide_head_to_head(1, 18, margin=0.05, alpha=0.025).verdict is Verdict.rollback


def test_the_bounds_are_where_the_mixture_reaches_one_over_alpha() -> None:
    for total, n, alpha in [(30, 100, 0.05), (2.5, 7, 0.01), (900, 1000, 0.0125)]:
        cs = mean_cs(total, n, alpha)
        assert 0 < cs.lower < total / n < cs.upper < 1
        for bound in (cs.lower, cs.upper):
            assert float(log_mixture(total, n, bound)) == pytest.approx(math.log(1 / alpha), abs=1e-6)
        assert float(log_mixture(total, n, total / n)) <= 0  # the estimate itself is never rejected


def test_the_bernoulli_boundary_beats_hoeffding_where_bad_canaries_are() -> None:
    """Near 0 and 1 the mixture uses the outcomes' real variance: narrower than the best sub-Gaussian
    normal-mixture CS (sigma^2 = 1/4, its precision tuned for each n in hindsight) would be, and at most 10%
    wider at 1/2 (measured: 0.92, 0.84, 0.77 of it at 8% and n = 20, 50, 200; 0.86, 0.95, 1.05 at 1/2)."""

    def hoeffding_radius(n: int, alpha: float) -> float:
        v = n / 4
        rhos = np.geomspace(0.01, 1000, 4001)
        return float(np.min(np.sqrt((v + rhos) * (2 * math.log(1 / alpha) + np.log1p(v / rhos))))) / n

    for n in (20, 50, 200):
        near_zero = mean_cs(round(0.08 * n), n, 0.025)
        assert near_zero.upper - near_zero.estimate < 0.95 * hoeffding_radius(n, 0.025)
        even = mean_cs(n / 2, n, 0.025)
        assert even.upper - even.estimate < 1.1 * hoeffding_radius(n, 0.025)


def test_mean_cs_before_any_observation_is_the_whole_range() -> None:
    cs = mean_cs(0, 0, ALPHA)
    assert (cs.lower, cs.upper) == (0.0, 1.0) and math.isnan(cs.estimate)
    assert (difference_cs(0, 0, 0, 0, ALPHA).lower, difference_cs(0, 0, 0, 0, ALPHA).upper) == (-1.0, 1.0)


def test_intervals_are_clipped_to_the_parameter_range() -> None:
    assert mean_cs(0, 10, ALPHA).lower == 0.0
    assert mean_cs(10, 10, ALPHA).upper == 1.0
    assert 0.0 < mean_cs(1, 3, ALPHA).lower < 0.01 and 0.9 < mean_cs(1, 3, ALPHA).upper < 1.0
    assert -1.0 <= difference_cs(0, 5, 5, 5, ALPHA).lower <= difference_cs(0, 5, 5, 5, ALPHA).upper <= 1.0


def test_difference_cs_half_width_is_the_sum_of_two_half_widths_at_half_alpha() -> None:
    a, b = mean_cs(300, 1000, ALPHA / 2), mean_cs(500, 1200, ALPHA / 2)
    d = difference_cs(300, 1000, 500, 1200, ALPHA)
    assert d.estimate == pytest.approx(0.3 - 500 / 1200)
    assert (d.upper - d.lower) / 2 == pytest.approx((a.upper - a.lower) / 2 + (b.upper - b.lower) / 2)
    assert (d.lower, d.upper) == pytest.approx((a.lower - b.upper, a.upper - b.lower))


def test_the_cs_shrinks_and_holds_its_level_across_alpha() -> None:
    widths = [mean_cs(n / 2, n, ALPHA).upper - mean_cs(n / 2, n, ALPHA).lower for n in (100, 1000, 10000)]
    assert widths[0] > widths[1] > widths[2]
    assert mean_cs(50, 100, 0.01).upper > mean_cs(50, 100, 0.05).upper


def test_win_rate_cs_is_mean_cs() -> None:
    assert win_rate_cs(55.5, 100, ALPHA) == mean_cs(55.5, 100, ALPHA)


def test_the_rollback_reason_carries_the_figures() -> None:
    decision = decide_approval(14, 45, 295, 410, margin=0.05, alpha=ALPHA)
    cs = decision.interval
    assert decision.verdict is Verdict.rollback
    for figure in (
        "approval canary 0.31 (45 ratings)",
        "live 0.72 (410)",
        "difference -0.41",
        "95% anytime CS",
    ):
        assert figure in decision.reason
    assert f"[{cs.lower:.3f}, {cs.upper:.3f}] < 0" in decision.reason


def test_promote_when_the_lower_bound_clears_minus_the_margin() -> None:
    cs = difference_cs(600, 1000, 610, 1000, ALPHA)
    assert -0.2 < cs.lower < 0 < cs.upper
    promoted = decide_approval(600, 1000, 610, 1000, margin=-cs.lower + 0.01, alpha=ALPHA)
    waiting = decide_approval(600, 1000, 610, 1000, margin=-cs.lower - 0.01, alpha=ALPHA)
    assert promoted.verdict is Verdict.promote and "promote" in promoted.reason
    assert waiting.verdict is Verdict.undecided and "more ratings needed" in waiting.reason
    assert decide_approval(600, 1000, 610, 1000, margin=0.0, alpha=ALPHA).verdict is Verdict.undecided


def test_rollback_wins_when_the_cs_lies_inside_the_margin() -> None:
    cs = difference_cs(300, 2000, 1000, 2000, ALPHA)
    assert -0.5 < cs.lower <= cs.upper < 0
    assert decide_approval(300, 2000, 1000, 2000, margin=0.6, alpha=ALPHA).verdict is Verdict.rollback


def test_head_to_head_decides_against_one_half() -> None:
    lost = decide_head_to_head(30, 100, margin=0.05, alpha=ALPHA)
    assert lost.verdict is Verdict.rollback
    assert (
        "won 30 of 100 comparisons" in lost.reason
        and "win rate 0.30" in lost.reason
        and "< 0.5" in lost.reason
    )
    even = win_rate_cs(500, 1000, ALPHA)
    assert (
        decide_head_to_head(500, 1000, margin=0.5 - even.lower + 0.01, alpha=ALPHA).verdict is Verdict.promote
    )
    assert (
        decide_head_to_head(500, 1000, margin=0.5 - even.lower - 0.01, alpha=ALPHA).verdict
        is Verdict.undecided
    )
    assert decide_head_to_head(0, 0, margin=0.05, alpha=ALPHA).verdict is Verdict.undecided


@pytest.mark.parametrize(
    "call",
    [
        lambda: mean_cs(5, 4, ALPHA),
        lambda: mean_cs(-1, 4, ALPHA),
        lambda: mean_cs(1, 4, 0.0),
        lambda: mean_cs(1, 4, ALPHA, prior=(0.0, 1.0)),
        lambda: decide_approval(1, 2, 1, 2, margin=-0.1, alpha=ALPHA),
    ],
)
def test_nonsense_inputs_are_refused_with_a_reason(call) -> None:
    with pytest.raises(ValueError, match="must|need"):
        call()
