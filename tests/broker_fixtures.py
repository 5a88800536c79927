"""Broker fixtures: one embedded Tansu broker per test session, and a fast topic reader.

Imported by tests/conftest.py (``from tests.broker_fixtures import broker, consume_all``);
modules that must also run without that conftest import them the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from thumbtune.broker import EmbeddedBroker, ensure_topics, free_port
from thumbtune.contract import ADAPTERS_TOPIC, FEEDBACK_TOPIC
from thumbtune.settings import Settings

__all__ = ["ConsumeAll", "broker", "consume_all", "own_broker", "read_topic"]

ConsumeAll = Callable[..., list[ConsumerRecord]]


def read_topic(bootstrap: str, topic: str, expected: int | None, timeout: float = 30) -> list[ConsumerRecord]:
    """Every record of ``topic`` from the beginning, by manual assignment (no group join, so fast).

    Returns as soon as ``expected`` records arrived, or, with ``expected=None``, once it has read
    up to the end offsets as they were when it started; otherwise whatever it has at ``timeout``.
    Records are in arrival order, which is offset order within each partition.
    """
    deadline = time.monotonic() + timeout
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
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
    consumer groups read a topic from the start (the session `broker` holds other tests' events)."""
    with EmbeddedBroker(port=free_port(), log_file=log_dir / "tansu.log") as b:
        ensure_topics(b.bootstrap, {FEEDBACK_TOPIC: feedback_partitions, ADAPTERS_TOPIC: 1})
        yield b


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """An embedded broker on a free port with thumbtune's topics, shared by the whole session."""
    log_file = tmp_path_factory.mktemp("broker") / "tansu.log"
    settings = Settings()
    with EmbeddedBroker(port=free_port(), log_file=log_file) as b:
        ensure_topics(
            b.bootstrap,
            {FEEDBACK_TOPIC: settings.feedback_partitions, ADAPTERS_TOPIC: settings.adapters_partitions},
        )
        yield b


@pytest.fixture(scope="session")
def consume_all() -> ConsumeAll:
    """``consume_all(bootstrap, topic, expected, timeout=30)``: see :func:`read_topic`."""
    return read_topic
