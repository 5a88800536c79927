"""bench soak's figures from hand-made samples: latency windows, RSS growth, lost and duplicated ratings."""

from __future__ import annotations

import pytest

from benchmarks.soak import Request, ratings_check, rss_growth, window_stats
from thumbtune.core.contract import FeedbackEvent, FeedbackKind, Message, SamplingParams


@pytest.fixture
def feedback_event() -> FeedbackEvent:
    return FeedbackEvent(
        event_id="e0",
        response_id="r0",
        completion_id="chatcmpl-r0",
        api_key_id=None,
        answered_at=1.0,
        rated_at=2.0,
        base_model="tiny",
        base_fingerprint="f" * 32,
        adapter_version="v0",
        messages=[Message(role="user", content="hi")],
        prompt_token_ids=[1, 2],
        response_token_ids=[3],
        behaviour_logprobs=[-0.5],
        sampling=SamplingParams(temperature=1.0, top_p=1.0, max_tokens=1),
        finish_reason="length",
        kind=FeedbackKind.thumb,
        value="up",
        reward=1.0,
    )


def test_windows_take_p50_p99_of_answered_requests_and_count_5xx() -> None:
    requests = [Request(100.0 + i, latency_s=float(i % 10), status=200, stream=False) for i in range(20)]
    requests += [Request(105.0, 9.0, 503, True), Request(115.0, 1.0, 200, False, feedback_status=500)]
    requests += [Request(116.0, 30.0, -1, True)]  # no answer: not a latency, not a 5xx
    first, second = window_stats(requests, 100.0, 10.0)
    assert first == {"window": 0, "requests": 11, "p50_s": 5.0, "p99_s": 9.0, "5xx": 1}
    assert (second["requests"], second["p50_s"], second["5xx"]) == (12, 4.0, 1)  # 0, 1, 1, 2, ..., 9


def test_rss_growth_compares_the_last_minute_with_the_minute_after_warm_up() -> None:
    samples = [(float(t), 1000 if t < 60 else 2000 if t < 120 else 2100) for t in range(0, 400, 5)]
    assert rss_growth(samples, 0.0, 60.0) == pytest.approx(0.05)
    assert rss_growth(samples, 0.0, 390.0) is None  # no minute after the warm-up to compare with


def _event(event_id: str, response_id: str, template: FeedbackEvent) -> FeedbackEvent:
    return template.model_copy(update={"event_id": event_id, "response_id": response_id})


def test_lost_and_duplicated_ratings(feedback_event: FeedbackEvent) -> None:
    published = [_event("e1", "r1", feedback_event), _event("e2", "r2", feedback_event)]
    published += [_event("e2", "r2", feedback_event), _event("e4", "r4", feedback_event)]
    check = ratings_check(["r1", "r2", "r3"], published)
    assert check == {"accepted": 3, "published": 4, "lost": 1, "duplicated": 2}
