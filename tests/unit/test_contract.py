"""The wire contract's rules that the server and the learner both rely on."""

from __future__ import annotations

import json

import pytest

from thumbtune.core.contract import FeedbackEvent, FeedbackKind, Message, SamplingParams, reward_for


def event(**overrides: object) -> FeedbackEvent:
    fields: dict = {
        "event_id": "e1",
        "response_id": "r1",
        "completion_id": "c1",
        "api_key_id": None,
        "answered_at": 1.0,
        "rated_at": 2.0,
        "base_model": "m",
        "base_fingerprint": "f",
        "adapter_version": "v0",
        "messages": [Message(role="user", content="hi")],
        "prompt_token_ids": [1, 2],
        "response_token_ids": [3],
        "behaviour_logprobs": [-0.5],
        "sampling": SamplingParams(temperature=1.0, top_p=1.0, max_tokens=4),
        "finish_reason": "stop",
        "kind": FeedbackKind.thumb,
        "value": "up",
        "reward": 1.0,
    }
    return FeedbackEvent(**(fields | overrides))


@pytest.mark.parametrize(
    ("place", "size", "reward"),
    [(1, 2, 1.0), (2, 2, -1.0), (1, 3, 1.0), (2, 3, 0.0), (3, 3, -1.0), (2, 4, 1 / 3), (3, 4, -1 / 3)],
)
def test_a_rankings_reward_is_linear_in_the_place(place: int, size: int, reward: float) -> None:
    assert reward_for(FeedbackKind.ranking, place, size) == pytest.approx(reward)


@pytest.mark.parametrize(("place", "size"), [(0, 3), (4, 3), (1, 1), (1, None)])
def test_a_place_outside_the_ranking_has_no_reward(place: int, size: int | None) -> None:
    with pytest.raises(ValueError, match="place"):
        reward_for(FeedbackKind.ranking, place, size)


def test_only_rankings_carry_ranking_fields_and_other_events_keep_their_json() -> None:
    thumb = json.loads(event().to_bytes())
    assert "ranking_id" not in thumb and "ranking_size" not in thumb  # what learners before rankings read
    ranked = event(kind=FeedbackKind.ranking, value=2, reward=0.0, ranking_id="k", ranking_size=3)
    assert FeedbackEvent.from_bytes(ranked.to_bytes()) == ranked
    with pytest.raises(ValueError, match="ranking_id and ranking_size"):
        event(kind=FeedbackKind.ranking, value=1, reward=1.0)
    with pytest.raises(ValueError, match="ranking_id and ranking_size"):
        event(ranking_id="k", ranking_size=2)
    with pytest.raises(ValueError, match="place 1..3"):
        event(kind=FeedbackKind.ranking, value=4, reward=-1.0, ranking_id="k", ranking_size=3)
