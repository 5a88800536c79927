"""Telling the servers about a new version: `AdapterAnnouncement`s on ``thumbtune.adapters``.

An announcement is sent only once its version is durable in the store, and it is derived from the
version's manifest alone, so announcing the same version twice sends the same facts twice: servers
treat a repeat as a no-op. That is what makes the restart rule simple: a learner that died between
writing a version and announcing it finds, on start, that the newest version in the store is not among
the last announcements on the topic, and announces it then (`announce_latest_if_missing`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kafka import KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from thumbtune.core.contract import ADAPTERS_TOPIC, AdapterAnnouncement
from thumbtune.core.kafka import close_producer, make_consumer, make_producer
from thumbtune.core.settings import Settings
from thumbtune.core.store import AdapterStore

log = logging.getLogger(__name__)

SUMMARY_STATS = (
    "mean_reward",
    "kl_ref",
    "beta",
    "approx_kl",
    "clipfrac",
    "entropy",
    "explained_variance",
    "is_ess",
    "policy_loss",
    "value_loss",
    "response_length_drift",
)
"""Diagnostics copied from the manifest into the announcement (the rest stay in the manifest)."""

_RETRY_S = (0.5, 5.0)
"""Announcement retry back-off, first and longest."""
_TAIL = 32
"""Announcements read back per partition on start: the newest version, if announced, is among the last."""


def announcement_for(store: AdapterStore, version: str) -> AdapterAnnouncement:
    """The announcement of a stored version, from its manifest (so a re-announcement is identical)."""
    manifest = store.read_manifest(version)
    return AdapterAnnouncement(
        version=manifest.version,
        parent=manifest.parent,
        sha256=manifest.sha256,
        base_model=manifest.base_model,
        base_fingerprint=manifest.base_fingerprint,
        created_at=manifest.created_at,
        event_count=manifest.event_count,
        stats={k: manifest.diagnostics[k] for k in SUMMARY_STATS if k in manifest.diagnostics},
    )


class Announcer:
    """An idempotent, acks=all producer for ``thumbtune.adapters``, recreated after any failure."""

    def __init__(self, settings: Settings, timeout_s: float = 10.0) -> None:
        self._settings = settings
        self._timeout_s = timeout_s
        self._producer: KafkaProducer | None = None

    def announce(self, announcement: AdapterAnnouncement) -> None:
        """Send and flush; raises KafkaError if the broker did not acknowledge within the timeout."""
        try:
            if self._producer is None:
                self._producer = make_producer(
                    self._settings,
                    "thumbtune-learner",
                    acks="all",
                    enable_idempotence=True,
                    retries=5,
                    request_timeout_ms=5000,
                    max_block_ms=int(self._timeout_s * 1000),
                    allow_auto_create_topics=False,
                )
            future = self._producer.send(
                ADAPTERS_TOPIC, key=announcement.version.encode(), value=announcement.to_bytes()
            )
            future.get(timeout=self._timeout_s)
            self._producer.flush(timeout=self._timeout_s)
        except (KafkaError, OSError):
            self.close()  # an idempotent producer whose broker forgot its id never recovers: start over
            raise
        log.info("announced %s on %s", announcement.version, ADAPTERS_TOPIC)

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            close_producer(producer, timeout=2)


def recent_announcements(settings: Settings, timeout_s: float = 10.0) -> list[AdapterAnnouncement] | None:
    """The last few announcements of every partition of the topic; None if it could not be read.

    Manual assignment (no group), so it costs a metadata round trip, not a group join.
    """
    deadline = time.monotonic() + timeout_s
    consumer = make_consumer(
        settings,
        "thumbtune-learner-announcements",
        group_id=None,
        request_timeout_ms=int(timeout_s * 1000),
    )
    try:
        partitions = consumer.partitions_for_topic(ADAPTERS_TOPIC)
        while not partitions:  # metadata arrives a moment after the first request
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)
            partitions = consumer.partitions_for_topic(ADAPTERS_TOPIC)
        tps = [TopicPartition(ADAPTERS_TOPIC, p) for p in sorted(partitions)]
        consumer.assign(tps)
        ends = consumer.end_offsets(tps)
        starts = consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(starts[tp], ends[tp] - _TAIL))
        found: list[AdapterAnnouncement] = []
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                return None
            for records in consumer.poll(timeout_ms=200).values():
                for record in records:
                    try:
                        found.append(AdapterAnnouncement.from_bytes(record.value))
                    except ValueError:
                        log.warning(
                            "ignoring a malformed record on %s at %s:%d",
                            ADAPTERS_TOPIC,
                            record.partition,
                            record.offset,
                        )
        return found
    except KafkaError as exc:
        log.warning("could not read back %s: %r", ADAPTERS_TOPIC, exc)
        return None
    finally:
        consumer.close()


def announce_latest_if_missing(settings: Settings, store: AdapterStore, announcer: Announcer) -> str | None:
    """Announce the store's newest version unless it already was; return it if it was announced now.

    A learner announces every version before training the next, so only the newest can be missing.
    When the topic cannot be read it announces anyway: a repeat is harmless, a missing one is not.
    """
    version = store.latest()
    if version is None:
        return None
    announcement = announcement_for(store, version)
    recent = recent_announcements(settings)
    if recent is not None and any(a.version == version and a.sha256 == announcement.sha256 for a in recent):
        log.info("newest version %s was already announced", version)
        return None
    log.info(
        "newest version %s was not announced (the learner stopped before it could): announcing it", version
    )
    announcer.announce(announcement)
    return version


def retrying(what: str, attempt: Callable[[], bool], stopping: Callable[[], bool]) -> bool:
    """Run ``attempt`` (an announcement) until it succeeds (True) or ``stopping()`` (False), retrying Kafka
    and network errors with back-off."""
    delay = _RETRY_S[0]
    while True:
        try:
            return attempt()
        except (KafkaError, OSError) as exc:
            if stopping():
                return False
            log.warning("could not %s (%r); retrying in %.1f s", what, exc, delay)
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and not stopping():
                time.sleep(0.1)
            delay = min(delay * 2, _RETRY_S[1])
