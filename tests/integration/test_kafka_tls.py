"""Kafka over TLS end to end: the embedded broker behind a TLS terminator (socat) that requires a client
certificate, with a CA made by the test. Every client kind connects through it; a wrong CA, or TLS towards
a plaintext listener, stops start-up with a message that says what to fix, within seconds."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from kafka.errors import KafkaError

from service.app import create_app
from tests.support.api import USER
from tests.support.kafka import read_topic
from tests.support.tls import TLSKafka, missing_tools, tls_kafka
from thumbtune.core.contract import FEEDBACK_TOPIC, FeedbackEvent
from thumbtune.core.kafka import KafkaSecurityError, make_admin, make_consumer, make_producer, preflight
from thumbtune.core.settings import Settings

pytestmark = [pytest.mark.broker]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSKafka]:
    missing = missing_tools()
    if missing:
        pytest.skip(
            f"NO {' / '.join(missing).upper()}: Kafka over TLS is untested here (apt-get install {missing})"
        )
    with tls_kafka(tmp_path_factory.mktemp("tls")) as found:
        yield found


def test_producer_consumer_and_admin_connect_over_mutual_tls(tls: TLSKafka) -> None:
    settings = Settings(**tls.settings())
    preflight(settings)
    admin = make_admin(tls.bootstrap, 5000, settings)
    try:
        assert FEEDBACK_TOPIC in admin.list_topics()
    finally:
        admin.close()
    producer = make_producer(settings, "tls-test", acks="all")
    try:
        producer.send("tls-test-topic", key=b"k", value=b"over tls").get(timeout=20)
    finally:
        producer.close()
    consumer = make_consumer(settings, "tls-test", group_id=None, auto_offset_reset="earliest")
    try:
        records = read_topic(tls.bootstrap, "tls-test-topic", expected=1, settings=settings)
        assert [r.value for r in records] == [b"over tls"]
        assert "tls-test-topic" in consumer.topics()
    finally:
        consumer.close()


def test_plaintext_clients_get_nothing_from_the_tls_listener(tls: TLSKafka) -> None:
    with pytest.raises((KafkaError, OSError)):
        admin = make_admin(tls.bootstrap, 2000)
        try:
            admin.list_topics()
        finally:
            admin.close()


def test_a_server_serves_and_publishes_ratings_over_tls(settings_factory, tls: TLSKafka) -> None:  # noqa: ANN001
    with TestClient(create_app(settings_factory(**tls.settings()))) as client:
        control = client.app.state.runtime.control
        assert control.replayed and control.connected.wait(10)  # the control log, read over TLS
        rid = client.post(
            "/v1/chat/completions", json={"model": "thumbtune", "messages": USER, "max_tokens": 2}
        ).json()["id"]
        assert client.post("/v1/feedback", json={"response_id": rid, "thumb": "up"}).status_code == 202
        assert client.app.state.runtime.publisher.flush(timeout=20)
        settings = Settings(**tls.settings())
        events = [
            FeedbackEvent.model_validate_json(r.value)
            for r in read_topic(tls.bootstrap, FEEDBACK_TOPIC, expected=None, settings=settings)
        ]
        assert rid in {e.response_id for e in events}


def test_a_wrong_ca_stops_start_up_with_a_clear_message(settings_factory, tls: TLSKafka) -> None:  # noqa: ANN001
    start = time.monotonic()
    with pytest.raises(KafkaSecurityError, match="failed verification.*THUMBTUNE_KAFKA_SSL_CAFILE"):
        with TestClient(create_app(settings_factory(**tls.settings(kafka_ssl_cafile=tls.wrong_ca)))):
            pass
    assert time.monotonic() - start < 15  # before the model loads, not after a client's retries


def test_tls_towards_a_plaintext_listener_is_named(tls: TLSKafka) -> None:
    settings = Settings(**tls.settings(kafka_bootstrap_servers=tls.plaintext_bootstrap))
    start = time.monotonic()
    with pytest.raises(
        KafkaSecurityError, match="TLS handshake failed.*THUMBTUNE_KAFKA_SECURITY_PROTOCOL=SSL"
    ):
        preflight(settings, timeout=3)
    assert time.monotonic() - start < 10


def test_an_unreachable_broker_is_an_outage_not_a_setting(tls: TLSKafka) -> None:
    preflight(Settings(**tls.settings(kafka_bootstrap_servers="127.0.0.1:1")))  # refused: left to retries
