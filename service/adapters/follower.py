"""Follow ``thumbtune.adapters``: every announcement reaches this replica's `AdapterManager`.

Each replica consumes the topic in a consumer group of its own (``thumbtune-server-<host>-<random>``),
so every replica sees every announcement. It starts at the end of the topic (start-up already
loaded the newest good version from the store) and never commits. Announcements sent while it
was not assigned the topic (the first group join, a rebalance, an outage) are not delivered, so
after every assignment it asks the manager to catch up from the store, where every announced
version is before it is announced. Repeats are no-ops.

Kafka never takes chat down: while the broker is unreachable the thread retries in the background
with backoff, and serving goes on with the live version.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid

from kafka import ConsumerRebalanceListener, KafkaConsumer

from service.adapters.manager import AdapterManager
from service.protocol_admin import FollowerView
from thumbtune.core.contract import ADAPTERS_TOPIC, AdapterAnnouncement, version_number
from thumbtune.core.kafka import TopicFollower, make_consumer
from thumbtune.core.settings import Settings

log = logging.getLogger(__name__)

CLOSE_MS = 100
"""Leaving the group is a courtesy (the group is this replica's alone): never hold shutdown up for it."""
BOOTSTRAP_MS = 2000
"""How long creating the consumer waits for an unreachable broker before the thread backs off and retries."""


class _CatchUpOnAssignment(ConsumerRebalanceListener):
    def __init__(self, follower: AdapterFollower) -> None:
        self.follower = follower

    def on_partitions_revoked(self, revoked: set) -> None:
        self.follower.assigned.clear()

    def on_partitions_assigned(self, assigned: set) -> None:
        self.follower.catch_up_due = True


class AdapterFollower(TopicFollower):
    topic, thread_name, close_timeout_ms = ADAPTERS_TOPIC, "thumbtune-adapter-follower", CLOSE_MS

    def __init__(self, settings: Settings, manager: AdapterManager, group_id: str | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.manager = manager
        self.group_id = group_id or f"thumbtune-server-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.assigned = threading.Event()
        """Set once the follower is assigned the topic and has caught up with the store (tests wait on it)."""
        self.catch_up_due = False
        self.announcements = 0

    def state(self) -> FollowerView:
        return FollowerView(
            group_id=self.group_id,
            assigned=self.assigned.is_set(),
            announcements=self.announcements,
            last_error=self.last_error,
        )

    def connect(self) -> KafkaConsumer:
        consumer = make_consumer(
            self.settings,
            "thumbtune-server-adapters",
            group_id=self.group_id,
            auto_offset_reset="latest",
            bootstrap_timeout_ms=BOOTSTRAP_MS,
        )
        consumer.subscribe([ADAPTERS_TOPIC], listener=_CatchUpOnAssignment(self))
        return consumer

    def on_records(self, polled: dict) -> None:
        if self.catch_up_due:
            self.catch_up_due = False
            self.manager.catch_up()
            self.assigned.set()
        received = time.monotonic()
        announcements = [
            parsed
            for records in polled.values()
            for record in records
            if (parsed := self._parse(record.value, f"{record.partition}:{record.offset}")) is not None
        ]
        # Newest first: once one goes live every older one is a no-op, so a backlog (the announcements of a
        # broker outage, delivered in one poll) costs one check and load, not one per version; an older one
        # is tried only if every newer one was refused (as if they had come one at a time).
        for announcement in sorted(announcements, key=_newest_first):
            self.manager.on_announcement(announcement, received)

    def on_failure(self, exc: Exception) -> None:
        self.assigned.clear()

    def _parse(self, value: bytes, where: str) -> AdapterAnnouncement | None:
        try:
            announcement = AdapterAnnouncement.from_bytes(value)
        except ValueError:
            log.warning("ignoring a malformed record on %s at %s", ADAPTERS_TOPIC, where)
            return None
        self.announcements += 1
        log.info("announcement of %s received (%s)", announcement.version, where)
        return announcement


def _newest_first(announcement: AdapterAnnouncement) -> int:
    try:
        return -version_number(announcement.version)
    except ValueError:
        return 0  # not a version name: the manager logs and ignores it
