"""The canary judge on hand-made tallies: the two tests at alpha / 2 each, rollback before promotion, the
window since the canary started, and an expired canary that says so."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from service.canary.judge import CanaryJudge, judge
from service.canary.ratings import BUCKET_S, VersionRatings
from service.canary.sequential import Verdict, decide_approval
from tests.unit.test_canary_ratings import event, thumb
from thumbtune.core.contract import ControlAction, FeedbackKind
from thumbtune.core.settings import Settings

SETTINGS = Settings(canary_alpha=0.05, canary_margin=0.05, canary_max_wait_s=600)
SINCE = 10 * BUCKET_S


def tallies(
    canary_up: int, canary_down: int, live_up: int, live_down: int, at: float = SINCE
) -> VersionRatings:
    ratings = VersionRatings()
    rows = [("v2", True)] * canary_up + [("v2", False)] * canary_down
    rows += [("v1", True)] * live_up + [("v1", False)] * live_down
    for i, (version, up) in enumerate(rows):
        ratings.add(thumb(f"r{i}", version, up, answered_at=at))
    return ratings


def test_a_canary_users_like_less_is_rolled_back_with_the_figures() -> None:
    result = judge(tallies(5, 45, 40, 10), "v2", "v1", SINCE, SETTINGS, now=SINCE + 60)
    assert result.verdict is Verdict.rollback and not result.expired
    assert result.approval.verdict is Verdict.rollback
    assert "approval canary 0.10 (50 ratings)" in result.reason and "< 0" in result.reason
    # alpha is split between the two tests: the approval test ran at 0.025
    assert result.approval == decide_approval(5, 50, 40, 50, margin=0.05, alpha=0.025)


def test_a_canary_users_like_more_is_promoted_and_an_even_one_waits() -> None:
    assert judge(tallies(45, 5, 10, 40), "v2", "v1", SINCE, SETTINGS, now=SINCE).verdict is Verdict.promote
    even = judge(tallies(25, 25, 25, 25), "v2", "v1", SINCE, SETTINGS, now=SINCE + 60)
    assert even.verdict is Verdict.undecided and not even.expired
    late = judge(tallies(25, 25, 25, 25), "v2", "v1", SINCE, SETTINGS, now=SINCE + 601)
    assert late.verdict is Verdict.undecided and late.expired
    assert late.reason.startswith("still undecided after 601 s (THUMBTUNE_CANARY_MAX_WAIT_S)")


def test_only_answers_given_since_the_canary_started_count_for_live() -> None:
    ratings = tallies(5, 45, 0, 0)
    for i in range(200):  # live was loved long before the canary started: not evidence against it
        ratings.add(thumb(f"old{i}", "v1", True, answered_at=SINCE - 2 * BUCKET_S))
    result = judge(ratings, "v2", "v1", SINCE, SETTINGS, now=SINCE + 60)
    assert result.against.ratings == 0 and result.verdict is Verdict.undecided


def test_head_to_head_losses_roll_back() -> None:
    ratings = tallies(0, 0, 0, 0)
    for i in range(60):  # compare mode: the user chose live's answer over the canary's, 55 times of 60
        canary_won = i < 5
        ratings.add(
            event(f"a{i}", "v2" if canary_won else "v1", FeedbackKind.choice, "chosen", answered_at=SINCE)
        )
        ratings.add(
            event(
                f"b{i}",
                "v1" if canary_won else "v2",
                FeedbackKind.choice,
                "rejected",
                paired=f"a{i}",
                answered_at=SINCE,
            )
        )
    result = judge(ratings, "v2", "v1", SINCE, SETTINGS, now=SINCE + 60)
    assert (result.head_to_head.wins, result.head_to_head.losses) == (5, 55)
    assert (
        result.comparison.verdict is Verdict.rollback
    )  # (a choice's answers are ratings too: so does approval)
    assert result.verdict is Verdict.rollback and "won 5 of 60 comparisons" in result.reason


def test_a_canary_undecided_after_its_ratings_gives_way_to_the_newest_waiting_version() -> None:
    """Versions arrive faster than a canary can be judged: one the test cannot tell from live, after
    THUMBTUNE_CANARY_REPLACE_AFTER ratings of its answers, is replaced by the newest waiting version, once."""
    settings = SETTINGS.model_copy(update={"canary_replace_after": 40})
    early = judge(tallies(20, 19, 200, 200), "v2", "v1", SINCE, settings, now=SINCE + 60)
    assert early.verdict is Verdict.undecided and not early.replaceable
    even = judge(tallies(20, 20, 200, 200), "v2", "v1", SINCE, settings, now=SINCE + 60)
    assert even.exhausted and not even.expired and even.replaceable
    assert even.reason.startswith("still undecided after 40 ratings of its answers (THUMBTUNE_CANARY_REPLACE")
    decided = judge(tallies(5, 45, 40, 10), "v2", "v1", SINCE, settings, now=SINCE + 60)
    assert decided.verdict is Verdict.rollback and not decided.replaceable  # a decision is never replaced

    proposed: list[tuple] = []
    manager = SimpleNamespace(canary="v2", canary_since=SINCE, live="v1", waiting=None)
    judge_ = CanaryJudge(
        settings,
        manager,  # type: ignore[arg-type]
        tallies(20, 20, 200, 200),
        threading.Lock(),
        lambda *args, **kwargs: proposed.append((*args, kwargs)),
        ready=lambda: True,
    )
    judge_.step(now=SINCE + 60)
    assert proposed == []  # nothing newer to give way to: it stays, and says so
    manager.waiting = "v7"
    judge_.step(now=SINCE + 61)
    judge_.step(now=SINCE + 62)  # proposed once; the log's first record decides
    assert [(p[0], p[1], p[3]) for p in proposed] == [(ControlAction.canary, "v7", {"actor": "canary"})]
    assert proposed[0][2].startswith("replaces v2, still undecided after 40 ratings")


def test_a_canary_past_its_time_gives_way_too() -> None:
    expired = judge(tallies(2, 2, 20, 20), "v2", "v1", SINCE, SETTINGS, now=SINCE + 601)
    assert expired.expired and not expired.exhausted and expired.replaceable
