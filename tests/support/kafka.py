"""Kafka for the tests: a fast topic reader, a producer, and a broker of a test's own.

The fixtures over these (the session broker, a test's own `kafka`) are in tests/conftest.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from service.publisher import FeedbackPublisher
from thumbtune.cli.broker import EmbeddedBroker
from thumbtune.cli.process import free_port
from thumbtune.core.contract import ADAPTERS_TOPIC, CONTROL_TOPIC, FEEDBACK_TOPIC, FeedbackEvent
from thumbtune.core.kafka import connection_config, ensure_topics
from thumbtune.core.settings import Settings

ConsumeAll = Callable[..., list[ConsumerRecord]]
"""The `consume_all` fixture: `read_topic`."""


def read_topic(
    bootstrap: str, topic: str, expected: int | None, timeout: float = 30, settings: Settings | None = None
) -> list[ConsumerRecord]:
    """Every record of ``topic`` from the beginning, by manual assignment (no group join, so fast);
    ``settings``: the connection's security (None: plaintext).

    Returns as soon as ``expected`` records arrived, or, with ``expected=None``, once it has read
    up to the end offsets as they were when it started; otherwise whatever it has at ``timeout``.
    Records are in arrival order, which is offset order within each partition.
    """
    deadline = time.monotonic() + timeout
    security = {} if settings is None else connection_config(settings)
    consumer = KafkaConsumer(
        **(security | {"bootstrap_servers": bootstrap}),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id="thumbtune-tests",
    )
    try:
        partitions = None
        while not partitions and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                time.sleep(0.1)
        if not partitions:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps) if expected is None else {}
        records: list[ConsumerRecord] = []
        while time.monotonic() < deadline:
            if expected is not None and len(records) >= expected:
                break
            if expected is None and all(consumer.position(tp) >= ends[tp] for tp in tps):
                break
            for batch in consumer.poll(timeout_ms=100).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


@contextmanager
def own_broker(log_dir: Path, feedback_partitions: int = 1) -> Iterator[EmbeddedBroker]:
    """A fresh broker of a test's own: empty thumbtune topics, no committed group offsets. For tests whose
    consumer groups read a topic from the start (the session `broker` holds other tests' events). Tests
    take it as the `kafka` fixture (tests/conftest.py)."""
    b = EmbeddedBroker(port=free_port(), log_file=log_dir / "tansu.log").start()
    try:
        ensure_topics(b.bootstrap, {FEEDBACK_TOPIC: feedback_partitions, ADAPTERS_TOPIC: 1, CONTROL_TOPIC: 1})
        yield b
    finally:
        b.stop(grace=TEST_BROKER_STOP_GRACE_S)


TEST_BROKER_STOP_GRACE_S = 0.5
"""How long a test broker (a test's own, the session's) gets to exit on SIGTERM before SIGKILL
(EmbeddedBroker's default: 2 s). Idle, Tansu exits at once; but it waits ~5 s on a connection its client
has already closed (seen at the end of the control-plane and canary tests: one socket in CLOSE-WAIT), so
those tests waited out the full 2 s. Its storage is in memory and the test is over: nothing is lost by
killing it sooner."""


def produce(bootstrap: str, records: list[tuple[bytes, bytes]], topic: str = FEEDBACK_TOPIC) -> None:
    """Send (key, value) records to ``topic`` and wait until the broker has them all."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for key, value in records:
            producer.send(topic, key=key, value=value)
        producer.flush(timeout=30)
    finally:
        producer.close()


def feedback_events(
    publisher: FeedbackPublisher, bootstrap: str, response_ids: set[str], expected: int, timeout: float = 20
) -> dict[str, FeedbackEvent]:
    """The events on thumbtune.feedback (the session's tests share it) for these answers, by response id,
    once ``publisher`` (a test server's) has flushed: waits up to ``timeout`` s for ``expected`` of them,
    then asserts that is exactly how many there are."""
    assert publisher.flush(timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        records = read_topic(bootstrap, FEEDBACK_TOPIC, expected=None, timeout=5)
        mine = [
            e for e in (FeedbackEvent.from_bytes(r.value) for r in records) if e.response_id in response_ids
        ]
        if len(mine) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(mine) == expected, f"{len(mine)} events for {response_ids}, expected {expected}"
    return {e.response_id: e for e in mine}
