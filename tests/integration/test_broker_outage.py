"""Kafka never takes chat down: ratings spool while the broker is away and arrive, once each, when back."""

from __future__ import annotations

import pytest

from tests.support.api import USER
from tests.support.kafka import read_topic
from thumbtune.cli.broker import EmbeddedBroker
from thumbtune.cli.process import free_port
from thumbtune.core.contract import ADAPTERS_TOPIC, FEEDBACK_TOPIC, FeedbackEvent
from thumbtune.core.kafka import ensure_topics

pytestmark = pytest.mark.broker


def test_ratings_during_a_broker_outage_arrive_once_when_it_returns(client_factory, tmp_path) -> None:  # noqa: ANN001
    port = free_port()
    client = client_factory(kafka_bootstrap_servers=f"127.0.0.1:{port}")
    rids = []
    for i in range(6):
        body = {"model": "thumbtune", "messages": USER, "max_tokens": 3, "seed": i, "temperature": 1.0}
        rids.append(client.post("/v1/chat/completions", json=body).json()["id"])
    for i, rid in enumerate(rids):
        resp = client.post("/v1/feedback", json={"response_id": rid, "thumb": "up" if i % 2 else "down"})
        assert resp.status_code == 202, resp.text
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["broker"] is False
    assert ready.json()["spool_depth"] == 6
    # A repeat while spooling is still answered idempotently, not spooled twice.
    assert client.post("/v1/feedback", json={"response_id": rids[0], "thumb": "down"}).status_code == 200

    with EmbeddedBroker(port=port, log_file=tmp_path / "broker.log").start() as broker:
        ensure_topics(broker.bootstrap, {FEEDBACK_TOPIC: 3, ADAPTERS_TOPIC: 1})
        assert client.app.state.runtime.publisher.flush(timeout=60)
        events = [FeedbackEvent.from_bytes(r.value) for r in read_topic(broker.bootstrap, FEEDBACK_TOPIC, 6)]
        extra = read_topic(broker.bootstrap, FEEDBACK_TOPIC, None, timeout=3)
        assert len(extra) == 6, "an event was duplicated"
        assert sorted(e.response_id for e in events) == sorted(rids)
        assert client.get("/readyz").json()["broker"] is True
        assert client.get("/readyz").json()["spool_depth"] == 0


def test_full_spool_answers_503_with_retry_after_and_loses_nothing(client_factory) -> None:  # noqa: ANN001
    client = client_factory(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}", spool_max_events=2)
    rids = [
        client.post(
            "/v1/chat/completions", json={"model": "thumbtune", "messages": USER, "max_tokens": 2}
        ).json()["id"]
        for _ in range(3)
    ]
    assert [
        client.post("/v1/feedback", json={"response_id": r, "thumb": "up"}).status_code for r in rids[:2]
    ] == [202, 202]
    full = client.post("/v1/feedback", json={"response_id": rids[2], "thumb": "up"})
    assert full.status_code == 503 and full.headers["retry-after"]
    assert full.json()["error"]["code"] == "feedback_backlog"
    # The refused rating was not claimed: the user can retry it once there is room.
    publisher = client.app.state.runtime.publisher
    assert publisher.depth() == 2
    assert client.get("/readyz").status_code == 503
    # No broker comes back: stop the publisher here, as test_publisher does, rather than in the app's
    # shutdown, which gives it 10 s to send them. The two accepted ratings stay spooled for the next start.
    publisher.close(timeout=0.2)
    assert publisher.depth() == 2
