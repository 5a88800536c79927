"""benchmarks/canary_replay.py: the product's decision path (who answers, the tallies, the judge) on
synthetic ratings. Its error rates under continuous monitoring, end to end, and its accounting."""

from __future__ import annotations

import random

from benchmarks.canary_replay import Stream, canary_run, replay, summary
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
