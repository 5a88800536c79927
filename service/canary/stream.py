"""Fold ``thumbtune.feedback`` into `VersionRatings`: every replica's ratings, from the first on.

Each replica reads the whole topic by assignment (no consumer group, nothing committed), from the start
at its first connection and from where it stopped after a reconnection, so its tallies are everyone's
and survive its restarts. Reading a long topic at start-up takes a while (parsing ~10k events a second on
a CPU); until it has read to the end offsets it had when it started, `caught_up` is clear and the canary
judge waits. Kafka never takes chat down: while the broker is unreachable the thread retries with backoff.
"""

from __future__ import annotations

import logging
import threading
import time

from kafka import KafkaConsumer, TopicPartition

from service.canary.ratings import VersionRatings
from thumbtune.core.contract import FEEDBACK_TOPIC, FeedbackEvent
from thumbtune.core.kafka import TopicFollower, make_consumer
from thumbtune.core.settings import Settings

log = logging.getLogger(__name__)

BOOTSTRAP_MS = 2000


class RatingsFollower(TopicFollower):
    topic, thread_name = FEEDBACK_TOPIC, "thumbtune-ratings"

    def __init__(self, settings: Settings, ratings: VersionRatings, lock: threading.Lock) -> None:
        super().__init__()
        self.settings = settings
        self.ratings = ratings
        self.lock = lock
        """Held while an event is folded in (readers of ``ratings`` take it too)."""
        self.positions: dict[int, int] = {}
        """partition -> next offset to read."""
        self.caught_up = threading.Event()
        self.malformed = 0
        self._ends: dict[int, int] | None = None

    def connect(self) -> KafkaConsumer:
        consumer = make_consumer(
            self.settings, "thumbtune-server-ratings", group_id=None, bootstrap_timeout_ms=BOOTSTRAP_MS
        )
        partitions = None
        deadline = time.monotonic() + 10
        while not partitions and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(FEEDBACK_TOPIC)
            if not partitions:
                time.sleep(0.2)
        if not partitions:
            consumer.close()
            raise RuntimeError(f"{FEEDBACK_TOPIC} has no partitions (does the topic exist?)")
        tps = [TopicPartition(FEEDBACK_TOPIC, p) for p in sorted(partitions)]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, self.positions.get(tp.partition, 0))
        if self._ends is None:
            self._ends = {tp.partition: offset for tp, offset in consumer.end_offsets(tps).items()}
        return consumer

    def on_records(self, polled: dict) -> None:
        for tp, records in polled.items():
            for record in records:
                self._fold(record.value)
                self.positions[tp.partition] = record.offset + 1
        self._check_caught_up()

    def _fold(self, value: bytes) -> None:
        try:
            event = FeedbackEvent.from_bytes(value)
        except ValueError:
            self.malformed += 1  # the learner drops and counts these too
            return
        with self.lock:
            self.ratings.add(event)

    def _check_caught_up(self) -> None:
        if not self.caught_up.is_set() and self._ends is not None:
            if all(self.positions.get(p, 0) >= end for p, end in self._ends.items()):
                self.caught_up.set()
                log.info("%s read to its end at start-up: %d ratings", FEEDBACK_TOPIC, self.ratings.events)
