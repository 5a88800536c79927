"""The feedback publisher: spool first, Kafka later; nothing lost while the broker is down."""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time
import uuid
from pathlib import Path

import pytest

from service import metrics
from service.publisher import FeedbackPublisher, SpoolFull
from tests.support.kafka import ConsumeAll
from thumbtune.cli.broker import EmbeddedBroker
from thumbtune.cli.process import free_port
from thumbtune.core.kafka import ensure_topics
from thumbtune.core.settings import Settings

pytestmark = pytest.mark.broker


def make_settings(tmp_path: Path, bootstrap: str, **overrides: object) -> Settings:
    paths = {"cache_dir": tmp_path / "cache", "spool_dir": tmp_path / "spool"}
    return Settings(**paths, kafka_bootstrap_servers=bootstrap, **overrides)


def fresh_topic(bootstrap: str, partitions: int = 3) -> str:
    """A topic of its own, so that counts are exact whatever else the session broker carries."""
    topic = f"test.publisher.{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, {topic: partitions})
    return topic


def counter(c: object) -> float:
    return c._value.get()  # type: ignore[attr-defined]  # prometheus_client keeps no public getter


def test_published_events_arrive_in_order_with_their_keys(
    broker: EmbeddedBroker,
    consume_all: ConsumeAll,
    tmp_path: Path,  # noqa: F811
) -> None:
    topic = fresh_topic(broker.bootstrap)
    published_before = counter(metrics.EVENTS_PUBLISHED)
    sent = [(f"response-{i % 5}".encode(), f"event-{i}".encode()) for i in range(60)]
    with FeedbackPublisher(make_settings(tmp_path, broker.bootstrap)) as pub:
        for key, value in sent:
            pub.publish(topic, key, value)
        assert pub.flush(timeout=20)
        assert pub.depth() == 0 and pub.broker_up
        assert metrics.BROKER_UP._value.get() == 1  # type: ignore[attr-defined]
    records = consume_all(broker.bootstrap, topic, expected=None, timeout=10)  # all of it: catches duplicates
    assert len(records) == len(sent)
    for key in {k for k, _ in sent}:
        assert [r.value for r in records if r.key == key] == [v for k, v in sent if k == key]
    assert counter(metrics.EVENTS_PUBLISHED) - published_before == len(sent)


def test_events_wait_while_the_broker_is_down_then_arrive_once_in_order(
    consume_all: ConsumeAll,
    tmp_path: Path,  # noqa: F811
) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    topic = "test.publisher.outage"
    n = 50
    with FeedbackPublisher(make_settings(tmp_path, bootstrap)) as pub:
        for i in range(n):
            pub.publish(topic, b"one-key", b"%d" % i)
        time.sleep(0.5)  # the drain thread tries, and fails, to reach the broker
        assert pub.depth() == n and not pub.broker_up
        assert metrics.BROKER_UP._value.get() == 0  # type: ignore[attr-defined]
        with EmbeddedBroker(port=port, log_file=tmp_path / "tansu.log") as late_broker:
            ensure_topics(late_broker.bootstrap, {topic: 1})
            assert pub.flush(timeout=30), f"{pub.depth()} events still spooled"
            assert pub.broker_up
            records = consume_all(bootstrap, topic, expected=None, timeout=10)  # all of it
            pub.close()  # before the broker stops, which then need not wait for our connection
    assert [r.value for r in records] == [b"%d" % i for i in range(n)]


def test_a_broker_that_stalls_mid_send_gets_every_event_once(
    consume_all: ConsumeAll,
    tmp_path: Path,  # noqa: F811
) -> None:
    """A frozen broker (SIGSTOP, as bench soak's pause) takes the requests it was sent when it wakes up; the
    producer's own retries must carry them (Kafka drops the copies by sequence number), not a new producer
    that sends them again (bench soak saw a rating twice on the topic when sends gave up after 10 s)."""
    port = free_port()
    topic = "test.publisher.stall"
    with EmbeddedBroker(port=port, log_file=tmp_path / "tansu.log") as broker:
        ensure_topics(broker.bootstrap, {topic: 1})
        with FeedbackPublisher(make_settings(tmp_path, broker.bootstrap)) as pub:
            pub.publish(topic, b"k", b"before")
            assert pub.flush(timeout=20)
            os.kill(broker.pid, signal.SIGSTOP)
            try:
                for i in range(20):
                    pub.publish(topic, b"k", b"%d" % i)
                time.sleep(15)  # past the request timeout (5 s) and the old delivery timeout (10 s)
                assert not pub.broker_up and pub.depth() == 20  # readiness says so while it waits
            finally:
                os.kill(broker.pid, signal.SIGCONT)
            assert pub.flush(timeout=60), f"{pub.depth()} events still spooled"
            records = consume_all(broker.bootstrap, topic, expected=None, timeout=10)
            pub.close()
    assert [r.value for r in records] == [b"before"] + [b"%d" % i for i in range(20)]


def test_a_restarted_broker_that_forgot_everything_is_published_to_again(
    consume_all: ConsumeAll,
    tmp_path: Path,  # noqa: F811
) -> None:
    """In-memory Tansu forgets producer ids on restart; the publisher must replace its producer."""
    port = free_port()
    topic = "test.publisher.restart"
    with FeedbackPublisher(make_settings(tmp_path, f"127.0.0.1:{port}")) as pub:
        with EmbeddedBroker(port=port) as first:
            ensure_topics(first.bootstrap, {topic: 1})
            pub.publish(topic, b"k", b"before")
            assert pub.flush(timeout=20)
        for i in range(10):
            pub.publish(topic, b"k", b"%d" % i)
        with EmbeddedBroker(port=port) as second:
            ensure_topics(second.bootstrap, {topic: 1})
            assert pub.flush(timeout=30), f"{pub.depth()} events still spooled"
            records = consume_all(second.bootstrap, topic, expected=None, timeout=10)
            pub.close()
    assert [r.value for r in records] == [b"%d" % i for i in range(10)]


def test_full_spool_refuses_with_spool_full(tmp_path: Path) -> None:
    rejected_before = counter(metrics.SPOOL_REJECTED)
    with FeedbackPublisher(make_settings(tmp_path, f"127.0.0.1:{free_port()}", spool_max_events=5)) as pub:
        for i in range(5):
            pub.publish("t", b"k", b"%d" % i)
        with pytest.raises(SpoolFull, match="full") as info:
            pub.publish("t", b"k", b"one too many")
        assert info.value.retry_after_s > 0
        assert pub.depth() == 5
        assert metrics.SPOOL_DEPTH._value.get() == 5  # type: ignore[attr-defined]
        pub.close(timeout=0.2)
    assert counter(metrics.SPOOL_REJECTED) - rejected_before == 1


def test_spooled_events_survive_closing_and_reopening(
    consume_all: ConsumeAll,
    tmp_path: Path,  # noqa: F811
) -> None:
    port = free_port()
    settings = make_settings(tmp_path, f"127.0.0.1:{port}")
    topic = "test.publisher.reopen"
    first = FeedbackPublisher(settings)
    first.start()
    for i in range(20):
        first.publish(topic, b"k", b"%d" % i)
    first.close(timeout=0.2)
    assert first.depth() == 20

    with FeedbackPublisher(settings) as second:
        assert second.depth() == 20
        second.publish(topic, b"k", b"20")
        with EmbeddedBroker(port=port) as late_broker:
            ensure_topics(late_broker.bootstrap, {topic: 1})
            assert second.flush(timeout=30)
            records = consume_all(late_broker.bootstrap, topic, expected=None, timeout=10)
            second.close()
    assert [r.value for r in records] == [b"%d" % i for i in range(21)]


def test_concurrent_publishers_lose_nothing(
    broker: EmbeddedBroker,
    consume_all: ConsumeAll,
    tmp_path: Path,  # noqa: F811
) -> None:
    topic = fresh_topic(broker.bootstrap)
    threads, per_thread = 8, 100
    with FeedbackPublisher(make_settings(tmp_path, broker.bootstrap)) as pub:

        def work(t: int) -> None:
            for i in range(per_thread):
                pub.publish(topic, f"thread-{t}".encode(), f"{t}:{i}".encode())

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert pub.flush(timeout=30)
    records = consume_all(broker.bootstrap, topic, expected=None, timeout=10)
    assert len(records) == threads * per_thread
    for t in range(threads):
        mine = [r.value for r in records if r.key == f"thread-{t}".encode()]
        assert mine == [f"{t}:{i}".encode() for i in range(per_thread)]


def test_publish_is_fast_and_does_not_wait_for_kafka(tmp_path: Path) -> None:
    value = b"x" * 4000  # about a feedback event with a few hundred tokens
    with FeedbackPublisher(make_settings(tmp_path, f"127.0.0.1:{free_port()}")) as pub:
        timings = []
        for _ in range(500):
            start = time.perf_counter()
            pub.publish("t", b"response-id", value)
            timings.append(time.perf_counter() - start)
        pub.close(timeout=0.2)
    p50 = statistics.median(timings)
    assert p50 < 0.001, f"median publish took {p50 * 1e3:.2f} ms"


def test_replicas_sharing_a_spool_directory_get_their_own_slots(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"127.0.0.1:{free_port()}")
    a, b = FeedbackPublisher(settings), FeedbackPublisher(settings)
    a.start()
    b.start()
    try:
        assert a.spool.path != b.spool.path
        a.publish("t", b"k", b"from-a")
        b.publish("t", b"k", b"from-b")
    finally:
        b.close(timeout=0.1)
        a.close(timeout=0.1)
    with FeedbackPublisher(settings) as c:  # adopts what b left in the slot nobody holds now
        assert c.depth() == 2
        c.close(timeout=0.1)


def test_oversized_or_untyped_events_are_refused(tmp_path: Path) -> None:
    with FeedbackPublisher(make_settings(tmp_path, f"127.0.0.1:{free_port()}")) as pub:
        with pytest.raises(ValueError, match="bytes"):
            pub.publish("t", b"k", b"x" * 1_000_001)
        with pytest.raises(TypeError):
            pub.publish("t", "k", b"v")  # type: ignore[arg-type]
        assert pub.depth() == 0
        pub.close(timeout=0.1)


def test_publish_before_start_says_so(tmp_path: Path) -> None:
    pub = FeedbackPublisher(make_settings(tmp_path, "127.0.0.1:1"))
    with pytest.raises(RuntimeError, match="not open"):
        pub.publish("t", b"k", b"v")
