"""benchmarks/canary_replay.py: the product's decision path (who answers, the tallies, the judge) on
synthetic ratings. Its error rates under continuous monitoring, end to end, and its accounting."""

from __future__ import annotations

import math
import random

import pytest

from benchmarks.canary_bound import log_likelihood_ratio, oracle, win_probability
from benchmarks.canary_replay import Outcome, Stream, canary_run, met_target, replay, summary
from service.serving_models import ServingModels
from thumbtune.core.settings import Settings

SETTINGS = Settings(canary_share=0.1, canary_compare_share=0.5)


def test_an_equal_canary_is_rarely_rolled_back_by_the_judge_looking_every_second() -> None:
    """A/A through VersionRatings and `judge`, both tests at alpha/2: a canary as good as live must not be
    rolled back in more than alpha = 5% of streams (each watched for 600 ratings)."""
    rolled_back = 0
    streams = 60
    for seed in range(streams):
        stream = Stream(random.Random(seed), SETTINGS, thumb_fraction=0.5, population=1000)
        verdict, *_ = canary_run(stream, "v0", "v1", {"v0": 0.5, "v1": 0.5}, 1e6, 2.0, 600)
        rolled_back += verdict == "rollback"
    assert rolled_back / streams <= 0.05 + 2 * (0.05 * 0.95 / streams) ** 0.5


def test_a_planted_bad_canary_is_rolled_back_and_a_good_one_promoted() -> None:
    runs = [replay(seed, SETTINGS, max_ratings=600) for seed in range(1, 11)]
    assert [[o.verdict for o in run] for run in runs] == [["promote", "rollback"]] * 10
    for run in runs:
        for outcome in run:
            assert 0 < outcome.ratings < 600
            assert 0.1 < outcome.canary_share_of_answers < 0.4  # 10% of users, half the mixed compares
    lines = summary(runs)
    assert lines[0].startswith("good: 10/10 promote, 0 wrong, 0 undecided")
    assert lines[1].startswith("bad: 10/10 rollback, 0 wrong, 0 undecided")


def test_a_choice_between_two_versions_is_a_head_to_head_and_a_thumb_an_approval() -> None:
    stream = Stream(random.Random(3), Settings(canary_share=0.5, canary_compare_share=1.0), 0.5, 50)

    class Registry:
        live, canary, canary_share = "v0", "v1", 0.5

        def resolve(self, requested: str) -> str:
            return requested or "v0"

    models = ServingModels(Registry(), "base", compare_share=1.0)
    given = {"v0": 0.0, "v1": 0.0}
    for i in range(200):
        for version, count in stream.rate_once(models, {"v0": 0.0, "v1": 1.0}, 1e6 + i).items():
            given[version] += count
    h2h = stream.ratings.head_to_head("v1", "v0")
    assert h2h.comparisons > 0 and h2h.losses == 0  # v1's answers always approved, v0's never
    canary, live = stream.ratings.approval("v1"), stream.ratings.approval("v0")
    assert canary.ratings and canary.rate == 1.0 and live.rate == 0.0
    assert sum(given.values()) == canary.ratings + live.ratings + 2 * h2h.comparisons


def test_the_sprt_bound_on_hand_computed_numbers() -> None:
    # a chooser picks the canary when only it is approved, and half the time when both or neither are
    assert win_probability(0.078, 0.75) == pytest.approx(0.078 * 0.25 + (0.078 * 0.75 + 0.922 * 0.25) / 2)
    assert win_probability(0.5, 0.5) == 0.5
    # 0 approvals in 3 thumbs, truth 0.1 against the null 0.75: 3 log(0.9 / 0.25); and 1 loss in 1 comparison
    # at w = 0.2 against 1/2: log(0.8 / 0.5)
    assert log_likelihood_ratio(0, 3, 0, 1, (0.1, 0.2), (0.75, 0.5)) == pytest.approx(
        3 * math.log(0.9 / 0.25) + math.log(0.8 / 0.5)
    )


def test_the_sprt_told_the_rates_is_never_wrong_and_never_slower_than_the_judge() -> None:
    settings = Settings(canary_share=0.1, canary_compare_share=0.0)
    for seed in range(1, 9):
        judged = replay(seed, settings, max_ratings=600)
        bound = replay(seed, settings, max_ratings=600, decide=oracle)
        assert [o.verdict for o in bound] == ["promote", "rollback"]
        # the same users up to the first decision; the SPRT decides no later than the judge
        assert bound[0].ratings <= judged[0].ratings


def test_an_equal_canary_is_rarely_rolled_back_by_the_sprt() -> None:
    """A/A for the bound: its rollback is an SPRT against 'as good as live', so Ville's alpha holds for it
    too (told a worse rate than the truth, it looks for a difference that is not there)."""
    settings = Settings(canary_share=0.1, canary_compare_share=0.5)
    told = oracle({"v0": 0.5, "v1": 0.3})
    streams, rolled_back = 200, 0
    for seed in range(streams):
        stream = Stream(random.Random(seed), settings, thumb_fraction=0.5, population=1000)
        verdict, *_ = canary_run(stream, "v0", "v1", {"v0": 0.5, "v1": 0.5}, 1e6, 2.0, 600, told)
        rolled_back += verdict == "rollback"
    assert rolled_back / streams <= 0.05 + 2 * (0.05 * 0.95 / streams) ** 0.5


def test_a_drill_meets_the_target_only_if_both_decisions_are_right_fast_and_the_bad_one_small() -> None:
    good, bad = Outcome("good", "promote", 150, 0.3), Outcome("bad", "rollback", 180, 0.04)
    assert met_target([good, bad])  # the good version's share is not limited
    assert not met_target([good, Outcome("bad", "rollback", 201, 0.04)])
    assert not met_target([good, Outcome("bad", "rollback", 180, 0.051)])
    assert not met_target([Outcome("good", "undecided", 1000, 0.05), bad])
    assert summary([[good, bad]])[-1].endswith("while canary): 100.0%; 20 of 20 in a row: 100.0%")
