"""Kafka clients as thumbtune builds them: bootstrap parsing, producers, consumers, the admin client,
consumer-group timing and topic creation. Every Kafka client of the server and the learner is made here,
so connection settings (servers today; TLS and SASL later) have one home.

What we measured against Tansu 0.6.0 (the embedded broker, thumbtune/cli/broker.py) with kafka-python
3.0.12, and why the defaults below are what they are:

* A consumer-group join completes after about ``session_timeout_ms / 2``. kafka-python 3's default session
  timeout is 45 s, so a default consumer waits ~23 s for its first record; with ``session_timeout_ms=6000``
  (the smallest Apache Kafka accepts by default) it is ~3 s: `consumer_group_config`. Manual ``assign()``
  without a group is immediate.
* A producer that sends to a missing topic gets it auto-created with 4 partitions even with
  ``allow_auto_create_topics=False``, so `ensure_topics` runs before clients connect.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from thumbtune.core.contract import ADAPTERS_TOPIC, CONTROL_TOPIC, FEEDBACK_TOPIC
from thumbtune.core.settings import Settings


def bootstrap_servers(servers: str) -> list[str]:
    """'a:9092, b:9092' -> ['a:9092', 'b:9092'] (THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS); ValueError if empty."""
    parsed = [s.strip() for s in servers.split(",") if s.strip()]
    if not parsed:
        raise ValueError(
            f"THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS={servers!r} names no server: give host:port[,host:port...]"
        )
    return parsed


def topic_partitions(settings: Settings) -> dict[str, int]:
    """thumbtune's topics and the partitions they get when thumbtune creates them."""
    return {
        FEEDBACK_TOPIC: settings.feedback_partitions,
        ADAPTERS_TOPIC: settings.adapters_partitions,
        CONTROL_TOPIC: 1,  # one order of decisions for every replica
    }


TOPIC_CONFIGS = {CONTROL_TOPIC: {"retention.ms": "-1", "retention.bytes": "-1"}}
"""Topic settings thumbtune asks for when it creates a topic: the control log is the cluster's state, so it
is never deleted (on a cluster whose topics are made by an operator, give thumbtune.control the same)."""


def consumer_group_config(settings: Settings) -> dict[str, int]:
    """KafkaConsumer keyword arguments that make group joins fast on Tansu and valid on Kafka.

    Joins on Tansu take about session_timeout_ms / 2; 6000 ms is the smallest session timeout Apache Kafka
    accepts by default (group.min.session.timeout.ms). kafka-python heartbeats from a background thread,
    so a short session timeout only bounds crash detection; long gaps between polls are governed by
    max_poll_interval_ms.
    """
    return {
        "max_poll_interval_ms": settings.kafka_max_poll_interval_ms,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 2000,
    }


def make_producer(settings: Settings, client_id: str, **options: Any) -> KafkaProducer:
    """A producer for the configured cluster; ``options`` are KafkaProducer's own (acks, retries, ...)."""
    return KafkaProducer(
        bootstrap_servers=bootstrap_servers(settings.kafka_bootstrap_servers), client_id=client_id, **options
    )


def make_consumer(
    settings: Settings, client_id: str, *, group_id: str | None, **options: Any
) -> KafkaConsumer:
    """A consumer for the configured cluster: in ``group_id`` (with `consumer_group_config`'s timing, which
    ``options`` may override) or, with ``group_id=None``, for manual assignment."""
    group = consumer_group_config(settings) if group_id is not None else {}
    return KafkaConsumer(
        bootstrap_servers=bootstrap_servers(settings.kafka_bootstrap_servers),
        client_id=client_id,
        group_id=group_id,
        enable_auto_commit=False,
        **(group | options),
    )


def make_admin(bootstrap: str, timeout_ms: int) -> KafkaAdminClient:
    return KafkaAdminClient(
        bootstrap_servers=bootstrap_servers(bootstrap),
        request_timeout_ms=timeout_ms,
        bootstrap_timeout_ms=timeout_ms,
        client_id="thumbtune-admin",
    )


def reachable(servers: list[str], timeout: float = 0.5) -> bool:
    """Whether any bootstrap server accepts a TCP connection.

    Cheap to ask before building a KafkaProducer, whose constructor blocks for its whole bootstrap timeout
    (and logs every refused retry) when nothing listens.
    """
    for server in servers:
        host, _, port = server.rpartition(":") if ":" in server else (server, "", "9092")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
            return True
        except (OSError, ValueError):
            continue
    return False


def ensure_topics(
    bootstrap: str, partitions: dict[str, int], timeout: float = 30, replication_factor: int = 1
) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are.

    Retries while the broker is still coming up, so it can run right after a broker starts. Raises
    RuntimeError naming the topics and the last error once ``timeout`` has passed, or at once when the
    broker refuses the request itself (bad partition count, replication factor).
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            admin = make_admin(bootstrap, timeout_ms=max(1000, min(10_000, int(timeout * 1000))))
            try:
                missing = [t for t in partitions if t not in set(admin.list_topics())]
                for topic in missing:
                    try:
                        admin.create_topics(
                            [
                                NewTopic(
                                    topic,
                                    partitions[topic],
                                    replication_factor,
                                    topic_configs=TOPIC_CONFIGS.get(topic),
                                )
                            ]
                        )
                    except TopicAlreadyExistsError:
                        pass  # created concurrently (or auto-created): fine
                return
            finally:
                admin.close()
        except KafkaError as exc:
            if exc.retriable is False:
                raise RuntimeError(f"{bootstrap} refused to create topics {partitions}: {exc}") from exc
            last_error = exc
        except OSError as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"could not create topics {sorted(partitions)} on {bootstrap} within {timeout:.0f} s: "
                f"{last_error!r}. Is a Kafka broker listening there (`thumbtune broker`)?"
            )
        time.sleep(0.2)
