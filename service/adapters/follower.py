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
from service.protocol import FollowerView
from thumbtune.core.contract import ADAPTERS_TOPIC, AdapterAnnouncement
from thumbtune.core.kafka import make_consumer
from thumbtune.core.settings import Settings

log = logging.getLogger(__name__)

POLL_MS = 200
MAX_BACKOFF_S = 30.0
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


class AdapterFollower:
    def __init__(self, settings: Settings, manager: AdapterManager, group_id: str | None = None) -> None:
        self.settings = settings
        self.manager = manager
        self.group_id = group_id or f"thumbtune-server-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.assigned = threading.Event()
        """Set once the follower is assigned the topic and has caught up with the store (tests wait on it)."""
        self.catch_up_due = False
        self.last_error: str | None = None
        self.announcements = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="thumbtune-adapter-follower", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Stop following; a thread still waiting on an unreachable broker finishes on its own (daemon)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def state(self) -> FollowerView:
        return FollowerView(
            group_id=self.group_id,
            assigned=self.assigned.is_set(),
            announcements=self.announcements,
            last_error=self.last_error,
        )

    def _consumer(self) -> KafkaConsumer:
        consumer = make_consumer(
            self.settings,
            "thumbtune-server-adapters",
            group_id=self.group_id,
            auto_offset_reset="latest",
            bootstrap_timeout_ms=BOOTSTRAP_MS,
        )
        consumer.subscribe([ADAPTERS_TOPIC], listener=_CatchUpOnAssignment(self))
        return consumer

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            consumer = None
            try:
                consumer = self._consumer()
                while not self._stop.is_set():
                    polled = consumer.poll(timeout_ms=POLL_MS)
                    if self.catch_up_due:
                        self.catch_up_due = False
                        self.manager.catch_up()
                        self.assigned.set()
                        self.last_error = None
                        backoff = 0.5
                    for records in polled.values():
                        for record in records:
                            self._handle(record.value, f"{record.partition}:{record.offset}")
            except Exception as exc:  # noqa: BLE001 - Kafka or a swap failed: retry, never take serving down
                self.assigned.clear()
                self.last_error = repr(exc)
                log.warning("following %s failed (%r); retrying in %.1f s", ADAPTERS_TOPIC, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(2 * backoff, MAX_BACKOFF_S)
            finally:
                if consumer is not None:
                    try:
                        consumer.close(autocommit=False, timeout_ms=CLOSE_MS)
                    except Exception:
                        log.debug("closing the adapters consumer failed", exc_info=True)

    def _handle(self, value: bytes, where: str) -> None:
        received = time.monotonic()
        try:
            announcement = AdapterAnnouncement.from_bytes(value)
        except ValueError:
            log.warning("ignoring a malformed record on %s at %s", ADAPTERS_TOPIC, where)
            return
        self.announcements += 1
        log.info("announcement of %s received (%s)", announcement.version, where)
        self.manager.on_announcement(announcement, received)
