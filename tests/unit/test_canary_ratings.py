"""The tallies canary decisions are made on: approval per version over a window, head-to-head pairs joined
from a choice's or a ranking's events in any order."""

from __future__ import annotations

import itertools

from service.canary.arena import Comparison
from service.canary.ratings import BUCKET_S, Approval, VersionRatings
from thumbtune.core.contract import FeedbackEvent, FeedbackKind, SamplingParams, reward_for


def event(
    response_id: str,
    version: str,
    kind: FeedbackKind,
    value: str | int,
    *,
    answered_at: float = 1000.0,
    paired: str | None = None,
    ranking_id: str | None = None,
    ranking_size: int | None = None,
) -> FeedbackEvent:
    return FeedbackEvent(
        event_id=f"e-{response_id}",
        response_id=response_id,
        completion_id="c",
        api_key_id=None,
        answered_at=answered_at,
        rated_at=answered_at + 1,
        base_model="m",
        base_fingerprint="f",
        adapter_version=version,
        messages=[{"role": "user", "content": "hi"}],
        prompt_token_ids=[1],
        response_token_ids=[2],
        behaviour_logprobs=[-0.1],
        sampling=SamplingParams(temperature=1.0, top_p=1.0, max_tokens=8),
        finish_reason="stop",
        kind=kind,
        value=value,
        reward=reward_for(kind, value, ranking_size),
        paired_response_id=paired,
        ranking_id=ranking_id,
        ranking_size=ranking_size,
    )


def thumb(response_id: str, version: str, up: bool, answered_at: float = 1000.0) -> FeedbackEvent:
    return event(response_id, version, FeedbackKind.thumb, "up" if up else "down", answered_at=answered_at)


def test_approval_counts_positive_rewards_per_version_from_a_given_minute_on() -> None:
    ratings = VersionRatings()
    for i, (version, up, at) in enumerate(
        [("v1", True, 0), ("v1", False, 0), ("v1", True, 2 * BUCKET_S), ("v2", False, 2 * BUCKET_S + 5)]
    ):
        ratings.add(thumb(f"r{i}", version, up, answered_at=at))
    ratings.add(event("r9", "v1", FeedbackKind.rating, 3, answered_at=3 * BUCKET_S))  # reward 0: not approved
    assert (ratings.approval("v1").ratings, ratings.approval("v1").approvals) == (4, 2)
    assert ratings.approval("v1").rate == 0.5
    since = ratings.approval("v1", since=2 * BUCKET_S + 30)  # whole minutes: the bucket of 2 min counts
    assert (since.ratings, since.approvals) == (2, 1)
    assert ratings.approval("v3").rate is None and ratings.approval("v3").ratings == 0
    assert sorted(ratings.versions()) == ["v1", "v2"] and ratings.events == 5


def test_a_choice_between_versions_is_a_head_to_head_whichever_event_arrives_first() -> None:
    ratings = VersionRatings()
    # chosen first, then its rejected answer (which names the chosen one)
    ratings.add(event("a1", "v2", FeedbackKind.choice, "chosen", paired="b1"))
    ratings.add(event("b1", "v1", FeedbackKind.choice, "rejected", paired="a1"))
    # rejected first: it waits for the chosen answer
    ratings.add(event("b2", "v2", FeedbackKind.choice, "rejected", paired="a2"))
    ratings.add(event("a2", "v1", FeedbackKind.choice, "chosen", paired="b2"))
    # best of three: two rejected answers name the chosen one, which names none
    ratings.add(event("b3", "v1", FeedbackKind.choice, "rejected", paired="a3"))
    ratings.add(event("a3", "v2", FeedbackKind.choice, "chosen"))
    ratings.add(event("c3", "v2", FeedbackKind.choice, "rejected", paired="a3"))  # same version: no evidence
    h2h = ratings.head_to_head("v2", "v1")
    assert (h2h.wins, h2h.losses, h2h.comparisons) == (2, 1, 3)
    assert (ratings.head_to_head("v1", "v2").wins, ratings.head_to_head("v1", "v2").losses) == (1, 2)
    assert sorted(ratings.comparisons(), key=str) == sorted(
        [Comparison("v2", "v1"), Comparison("v2", "v1"), Comparison("v1", "v2")], key=str
    )


def test_a_ranking_gives_every_pair_once_all_its_places_are_in_in_any_order() -> None:
    versions = {1: "v3", 2: "v1", 3: "v3", 4: "v2"}  # place -> version of the answer in it
    for order in itertools.islice(itertools.permutations(versions), 6):
        ratings = VersionRatings()
        for place in order[:-1]:
            ratings.add(
                event(
                    f"r{place}", versions[place], FeedbackKind.ranking, place, ranking_id="k", ranking_size=4
                )
            )
            assert ratings.comparisons() == []
        last = order[-1]
        ratings.add(
            event(f"r{last}", versions[last], FeedbackKind.ranking, last, ranking_id="k", ranking_size=4)
        )
        # pairs by place: (1,2) v3>v1, (1,3) same, (1,4) v3>v2, (2,3) v1<v3, (2,4) v1>v2, (3,4) v3>v2
        assert (ratings.head_to_head("v3", "v1").wins, ratings.head_to_head("v3", "v1").losses) == (1, 1)
        assert (ratings.head_to_head("v3", "v2").wins, ratings.head_to_head("v3", "v2").losses) == (2, 0)
        assert (ratings.head_to_head("v1", "v2").wins, ratings.head_to_head("v1", "v2").losses) == (1, 0)
        assert len(ratings.comparisons()) == 5


def test_choices_and_rankings_are_head_to_head_evidence_only_never_approval() -> None:
    ratings = VersionRatings()
    ratings.add(event("a", "v1", FeedbackKind.choice, "chosen"))
    ratings.add(event("b", "v1", FeedbackKind.choice, "rejected", paired="a"))  # v1 against itself
    ratings.add(event("c", "v2", FeedbackKind.choice, "chosen"))
    ratings.add(event("d", "v1", FeedbackKind.choice, "rejected", paired="c"))
    for place, version in enumerate(["v2", "v1"], start=1):
        ratings.add(event(f"k{place}", version, FeedbackKind.ranking, place, ranking_id="k", ranking_size=2))
    ratings.add(thumb("t", "v1", True))
    assert ratings.approval("v1") == Approval(1, 1) and ratings.approval("v2") == Approval(0, 0)
    assert (ratings.head_to_head("v2", "v1").wins, ratings.head_to_head("v2", "v1").losses) == (2, 0)
