"""What the server answers when it cannot take a request, and that nothing is lost or half-taken then:
a rating too large for Kafka, a full spool, a stopped engine (streaming too), a store that does not answer,
a server still starting."""

from __future__ import annotations

import pytest

from service import publisher as publisher_module
from service.dependencies import get_runtime_or_none
from service.publisher import SpoolFull
from tests.support.api import USER, assert_openai_error, chat

pytestmark = pytest.mark.broker


def answer_ids(client, n: int = 1) -> list[str]:  # noqa: ANN001
    body = chat(client, max_tokens=4, n=n).json()
    return [c["response_id"] for c in body["choices"]]


@pytest.mark.parametrize("kind", ["thumb", "choice"])
def test_a_rating_too_large_for_kafka_is_a_413_and_claims_nothing(
    client, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:  # noqa: ANN001
    ids = answer_ids(client, n=2)
    rating = (
        {"response_id": ids[0], "thumb": "up"} if kind == "thumb" else {"chosen": ids[0], "rejected": ids[1]}
    )
    monkeypatch.setattr(publisher_module, "_MAX_EVENT_BYTES", 500)  # the tiny model's events are ~1.5 KB

    err = assert_openai_error(client.post("/v1/feedback", json=rating), 413)
    assert err["code"] == "event_too_large" and "Kafka takes at most 500" in err["message"]
    assert client.app.state.runtime.publisher.depth() == 0  # nothing spooled

    monkeypatch.undo()  # the same rating, once it fits, is new: the refused one claimed nothing
    accepted = client.post("/v1/feedback", json=rating)
    assert accepted.status_code == 202 and accepted.json()["status"] == "accepted"


def test_a_full_spool_answers_with_its_own_retry_after(client, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    (rid,) = answer_ids(client)
    publisher = client.app.state.runtime.publisher

    def full(topic: str, key: bytes, value: bytes) -> None:
        raise SpoolFull("the disk is full", retry_after_s=7)

    monkeypatch.setattr(publisher, "publish", full)
    refused = client.post("/v1/feedback", json={"response_id": rid, "thumb": "up"})
    assert_openai_error(refused, 503)
    assert refused.headers["retry-after"] == "7"
    monkeypatch.undo()
    assert client.post("/v1/feedback", json={"response_id": rid, "thumb": "up"}).status_code == 202


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_a_stopped_engine_is_a_503_even_when_streaming(client, stream: bool) -> None:  # noqa: ANN001
    client.app.state.runtime.engine.stop()
    resp = chat(client, max_tokens=4, stream=stream)
    err = assert_openai_error(resp, 503)
    assert err["code"] == "unavailable" and "shutting down" in err["message"]
    assert resp.headers["content-type"].startswith("application/json")


def test_readiness_needs_the_completion_store(client, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    assert client.get("/readyz").json()["store"] is True
    monkeypatch.setattr(client.app.state.runtime.store, "ping", lambda: False)  # Redis went away
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["status"] == "not ready" and ready.json()["store"] is False


def test_a_server_still_starting_says_so(client) -> None:  # noqa: ANN001
    client.app.dependency_overrides[get_runtime_or_none] = lambda: None
    try:
        assert client.get("/readyz").status_code == 503 and client.get("/readyz").json() == {
            "status": "starting"
        }
        body = {"model": "thumbtune", "messages": USER}
        err = assert_openai_error(client.post("/v1/chat/completions", json=body), 503)
        assert err["code"] == "starting"
        assert client.get("/healthz").status_code == 200  # alive, just not ready
    finally:
        client.app.dependency_overrides.clear()
