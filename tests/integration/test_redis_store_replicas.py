"""Two server replicas sharing Redis: an answer from one can be rated at the other, once."""

from __future__ import annotations

import uuid

import pytest

from tests.support.api import USER


@pytest.mark.redis
def test_feedback_for_an_answer_from_another_replica(client_factory, redis_url: str) -> None:  # noqa: ANN001
    a = client_factory(redis_url=redis_url)
    b = client_factory(redis_url=redis_url)
    rid = a.post(
        "/v1/chat/completions", json={"model": "thumbtune", "messages": USER, "max_tokens": 4}
    ).json()["id"]
    assert b.app.state.runtime.store.get(rid) is not None
    first = b.post("/v1/feedback", json={"response_id": rid, "thumb": "up"})
    assert first.status_code == 202
    again = a.post("/v1/feedback", json={"response_id": rid, "thumb": "up"})
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    assert (
        b.post(
            "/v1/feedback", json={"response_id": f"chatcmpl-{uuid.uuid4().hex}", "thumb": "up"}
        ).status_code
        == 404
    )
