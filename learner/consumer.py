"""`thumbtune learn`: the long-running learner (group ``thumbtune-learner`` on ``thumbtune.feedback``).

Batching: every record is admitted or skipped one at a time (`Learner.admit`); an update runs as soon
as batch_size events are buffered, or once the oldest buffered event has waited max_wait_s and at least
min_batch are buffered. After each such update, up to refine_rounds updates on the learner's own answers
(`Learner.refine`) run while no batch is due: not a full batch buffered and waiting on the partitions,
no partial batch past max_wait_s, no buffered rating that one more version would make stale. Human
ratings always go first; a round never trains on an event.

Exactly once, across crashes. The manifest of the newest version in the adapter store is the source of
truth for where consumption stands: its ``offsets`` ('topic:partition' -> next offset) are cumulative and
cover exactly the records consumed before that version's batch was cut (trained, skipped, stale or
duplicate alike, so a bad record never blocks its partition). On every partition assignment the consumer
seeks to them (partitions the manifest does not name start at the group's committed offset, else the
earliest). The order after an update is: version durable (atomic rename) -> announced on
``thumbtune.adapters`` -> producer flushed -> offsets committed. Commits are only an optimisation, so a
crash anywhere re-reads from the newest manifest: events before it are never trained again, events
after it are never lost. A stop (SIGINT/SIGTERM) abandons an update before its save and finishes the
publication of one after it. A version that was saved but not announced is announced on the next start
(`learner.announce.announce_latest_if_missing`); event ids a producer sent twice are dropped against
every manifest's ``event_ids`` (`Learner.admit`). The crash test stops it between save and commit with
the test hook ``THUMBTUNE_LEARNER_TEST_PAUSE_AT`` (`KafkaLearner._pause_for_test`).

Refused versions: a `learner.control.ControlFollower` reads ``thumbtune.control`` in a thread into the
learner's refusals; the updates leave a refused head themselves (`Learner.step_off_refused`), offsets as is.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from learner import metrics
from learner.announce import Announcer, announce_latest_if_missing, announcement_for, retrying
from learner.config import LearnerSettings
from learner.control import ControlFollower
from learner.progress import Progress
from learner.trainer import Learner
from thumbtune.core.contract import FEEDBACK_TOPIC, LEARNER_GROUP, FeedbackEvent
from thumbtune.core.kafka import (
    consumer_group_config,
    ensure_topics,
    make_consumer,
    preflight,
    topic_partitions,
)
from thumbtune.core.settings import Settings

log = logging.getLogger(__name__)

TEST_PAUSE_ENV = "THUMBTUNE_LEARNER_TEST_PAUSE_AT"
_POLL_MS = 500  # the longest a stop request waits for the consumer


class StopRequested(BaseException):
    """Raised by the SIGINT/SIGTERM handler inside an update to abandon it (nothing is committed).

    A BaseException so that no ``except Exception`` on the way swallows it.
    """


def offset_key(topic: str, partition: int) -> str:
    """The manifest's key for a partition: 'topic:partition'."""
    return f"{topic}:{partition}"


class _SeekToManifest(ConsumerRebalanceListener):
    """Whatever the group assigns, start where the newest version's manifest says."""

    def __init__(self, loop: KafkaLearner) -> None:
        self.loop = loop

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.loop.rewind(f"partitions {sorted(p.partition for p in revoked)} revoked")

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.loop.seek_assigned(assigned)


class KafkaLearner:
    """The consume -> batch -> train -> announce -> commit loop around one `Learner`."""

    def __init__(
        self,
        settings: Settings,
        learner_settings: LearnerSettings,
        learner: Learner | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.settings = settings
        self.learner_settings = learner_settings
        self.learner = learner if learner is not None else Learner(settings, learner_settings)
        self.progress = progress if progress is not None else Progress(learner_settings.batch_size, tty=False)
        self.announcer = Announcer(settings)
        self.control = ControlFollower(settings, self.learner.refusals, self.learner.serving)
        store, latest = self.learner.store, self.learner.store.latest()
        self.durable: dict[str, int] = dict(store.read_manifest(latest).offsets) if latest else {}
        """Offsets of the newest version: where consumption restarts after a crash or a rebalance."""
        self.positions: dict[str, int] = dict(self.durable)
        """Next offset per partition after every record consumed so far (the next manifest's offsets)."""
        self.first_seen: dict[str, int] = {}
        """First offset read from partitions the manifest does not name: where a rewind goes back to."""
        self.pending: list[FeedbackEvent] = []
        self.pending_since: float | None = None
        self.refine_left = 0
        """Own-answer rounds still allowed before the next human batch (refine_rounds after each)."""
        self.versions: list[str] = []
        self.consumed = 0
        self.lag: int | None = None
        self.stopping = False
        self.interrupted = False
        """A stop came inside an update (under data parallelism the other ranks were inside it too)."""
        self._in_update = False
        self._generation = 0  # bumped by every rewind: records polled before it are stale
        self._paused: set[str] = set()
        self._drops = metrics.DropCounter()
        self._consumer: KafkaConsumer | None = None
        metrics.set_version(self.learner.version)

    # --- stopping --------------------------------------------------------------------------------

    def request_stop(self, why: str) -> None:
        """Stop consuming; an update in progress is abandoned (its events are re-read on the next start)."""
        if not self.stopping:
            log.info("%s: stopping", why)
        self.stopping = True
        if self._in_update:
            raise StopRequested(why)

    # --- rebalances --------------------------------------------------------------------------------

    def rewind(self, why: str) -> None:
        """Forget everything consumed since the newest version; the next assignment re-reads it."""
        if not self.stopping and (self.pending or self.positions != self.durable):
            log.info(
                "%s: re-reading from the newest version's offsets (%d buffered events dropped)",
                why,
                len(self.pending),
            )
        self.learner.admitted.difference_update(e.event_id for e in self.pending)
        self.pending, self.pending_since = [], None
        self.positions = dict(self.durable)
        self._generation += 1

    def seek_assigned(self, assigned: set[TopicPartition]) -> None:
        """Seek each assigned partition to the manifest's offset (or where it started since then).

        Runs on kafka-python's IO loop, so it only seeks: no network calls here.
        """
        self.rewind("partitions assigned")
        consumer = self._consumer
        assert consumer is not None
        for tp in sorted(set(assigned) | consumer.assignment()):
            key = offset_key(tp.topic, tp.partition)
            target = self.durable.get(key, self.first_seen.get(key))
            if target is not None:
                consumer.seek(tp, target)
        log.info(
            "assigned %s; manifest offsets %s", sorted(p.partition for p in assigned), self.durable or "none"
        )

    # --- the loop --------------------------------------------------------------------------------------

    def run(self, stop_when: Callable[[], bool] | None = None) -> list[str]:
        """Consume and train until `request_stop` (a signal) or ``stop_when()``; return versions written."""
        ls = self.learner_settings
        try:
            preflight(self.settings)  # a TLS misconfiguration stops here, named, instead of retrying forever
            ensure_topics(
                self.settings.kafka_bootstrap_servers, topic_partitions(self.settings), settings=self.settings
            )
            self.control.start()  # refusals of versions (learner/control.py), followed in a thread
            retrying(
                "announce the newest version",
                lambda: announce_latest_if_missing(self.settings, self.learner.store, self.announcer) or True,
                lambda: self.stopping,
            )
            self._consumer = self._subscribe()
            log.info(
                "consuming %s as %s from %s (batch %d, min %d after %.0f s)",
                FEEDBACK_TOPIC,
                LEARNER_GROUP,
                self.learner.version,
                ls.batch_size,
                ls.min_batch,
                ls.max_wait_s,
            )
            while not self.stopping and not (stop_when is not None and stop_when()):
                self._consume(self._consumer.poll(timeout_ms=self._poll_ms()))
                if self._due():
                    self._cut(ls.min_batch)
                self._observe()
                self.learner.heartbeat()  # data parallelism: the other ranks wait within their timeout
                if self.refine_left > 0 and not self.stopping and not self._batch_waiting():
                    self._refine()
        except StopRequested as stop:
            self.interrupted = True
            log.info("%s during an update: abandoned it; its events are trained after the restart", stop)
        finally:
            if self._consumer is not None:
                self._consumer.close(autocommit=False)
            self.announcer.close()
            self.control.stop()
        return self.versions

    def _subscribe(self) -> KafkaConsumer:
        poll_interval_ms = max(
            consumer_group_config(self.settings)["max_poll_interval_ms"],
            int(self.learner_settings.max_update_s * 1000),
        )
        consumer = make_consumer(  # ensure_topics has already said so clearly if no broker answers
            self.settings,
            "thumbtune-learner",
            group_id=LEARNER_GROUP,
            auto_offset_reset="earliest",
            max_poll_interval_ms=poll_interval_ms,
        )
        self._consumer = consumer  # the listener seeks through it
        consumer.subscribe([FEEDBACK_TOPIC], listener=_SeekToManifest(self))
        return consumer

    def _poll_ms(self) -> int:
        if self.pending_since is None:
            return _POLL_MS
        left = self.pending_since + self.learner_settings.max_wait_s - time.monotonic()
        return max(1, min(_POLL_MS, int(left * 1000)))

    def _due(self) -> bool:
        ls = self.learner_settings
        return (
            self.pending_since is not None
            and len(self.pending) >= ls.min_batch
            and time.monotonic() - self.pending_since >= ls.max_wait_s
        )

    def _batch_waiting(self) -> bool:
        """Human ratings go first: a batch is due, a full one is buffered and waiting on the partitions (by
        the lag), or one more version would make a buffered rating stale."""
        ls = self.learner_settings
        return (
            self._due()
            or len(self.pending) + (self.lag or 0) >= ls.batch_size
            or any(self.learner.is_stale(e, 1) for e in self.pending)
        )

    def _consume(self, polled: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        generation = self._generation
        for records in polled.values():
            for record in records:
                if self.stopping or self._generation != generation:
                    return  # stopping, or a rewind: the rest is re-read from the rewound offsets
                self._admit(record)
                if len(self.pending) >= self.learner_settings.batch_size:
                    self._cut(self.learner_settings.batch_size)

    def _admit(self, record: ConsumerRecord) -> None:
        key, offset = offset_key(record.topic, record.partition), record.offset
        expected = self.positions.get(key)
        if expected is not None and offset < expected:
            log.warning(
                "%s restarted at offset %d, before the %d the manifest expects: the topic was recreated "
                "(an embedded broker restarted?); reading it from there",
                key,
                offset,
                expected,
            )
        if key not in self.durable and key not in self.first_seen:
            self.first_seen[key] = offset
        self.positions[key] = offset + 1
        self.consumed += 1
        metrics.EVENTS_CONSUMED.inc()
        event = self.learner.admit(record.value, f"{key}@{offset}")
        if event is not None:
            self.pending.append(event)
            self.pending_since = self.pending_since or time.monotonic()

    def _cut(self, at_least: int) -> None:
        """Train on the buffer if, after dropping stale events, it still holds ``at_least``."""
        self.pending = self.learner.drop_stale(self.pending)
        if len(self.pending) < at_least:
            if not self.pending:
                self.pending_since = None
            return
        events, self.pending, self.pending_since = self.pending, [], None
        offsets = dict(self.positions)  # covers exactly the records consumed into this batch
        started = time.monotonic()
        version = self._updating(lambda: self.learner.train(events, offsets))
        self._drops.sync(self.learner.skips.total)
        if version is None:
            return  # nothing fresh: no version; these offsets ride along with the next one
        self.durable = offsets
        self.refine_left = self.learner_settings.refine_rounds
        self._publish(version, len(events), started, offsets)

    def _refine(self) -> None:
        """One update on the learner's own answers; its version covers the newest version's offsets."""
        self.refine_left -= 1
        offsets = dict(self.durable)
        started = time.monotonic()
        version = self._updating(lambda: self.learner.refine(offsets))
        if version is None:
            self.refine_left = 0  # the reward model is not trusted (or no prompts yet): wait for humans
            return
        self._publish(version, 0, started, offsets)

    def _updating(self, update: Callable[[], str | None]) -> str | None:
        """Run an update; a stop request meanwhile abandons it (`request_stop` raises inside it), unless its
        version is already durable: then that version is returned, to be announced like any other."""
        parent = self.learner.newest
        self._in_update = True
        try:
            return update()
        except (StopRequested, RuntimeError) as exc:
            if not self.stopping:
                raise
            # the RuntimeError: data parallelism, the other ranks stopped too, failing a collective under way
            written = self.learner.store.latest()
            if written is None or written == parent:
                raise exc if isinstance(exc, StopRequested) else StopRequested(f"stopping ({exc})") from exc
            self.interrupted = True  # the other ranks are inside a collective, or gone: not told to stop
            log.info("%s after %s was saved: publishing it, then stopping", exc, written)
            return written
        finally:
            self._in_update = False

    def _publish(self, version: str, events: int, started: float, offsets: dict[str, int]) -> None:
        """Record, announce, then commit a version just written."""
        self.versions.append(version)
        diagnostics = self.learner.store.read_manifest(version).diagnostics
        metrics.record_update(version, events, time.monotonic() - started, diagnostics)
        self.progress.trained(version, diagnostics)
        self._pause_for_test("after_save")
        announcement = announcement_for(self.learner.store, version)
        if not retrying(
            f"announce {version}",
            lambda: self.announcer.announce(announcement) or True,
            lambda: self.stopping,
        ):
            return  # stopping before it went out: the next start announces it
        metrics.ANNOUNCEMENTS.inc()
        self._pause_for_test("after_announce")
        self._commit(offsets)

    def _commit(self, offsets: dict[str, int]) -> None:
        """Commit the version's offsets for our partitions (an optimisation: manifests are the truth)."""
        consumer = self._consumer
        assert consumer is not None
        owned = {offset_key(tp.topic, tp.partition): tp for tp in consumer.assignment()}
        commit = {owned[k]: OffsetAndMetadata(v, "", -1) for k, v in offsets.items() if k in owned}
        try:
            consumer.commit(commit)
        except KafkaError as exc:
            metrics.COMMIT_FAILURES.inc()
            log.info("offset commit failed (%r); harmless, the manifest holds the offsets", exc)

    def _observe(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        lag = None
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                lag = (lag or 0) + max(0, highwater - consumer.position(tp))
        self.lag = lag
        if lag is not None:
            metrics.CONSUMER_LAG.set(lag)
        metrics.BUFFERED.set(len(self.pending))
        self._drops.sync(self.learner.skips.total)
        skipped = sum(self.learner.skips.total.values())
        self.progress.show(self.learner.version, len(self.pending), self.consumed, lag, skipped)

    def _pause_for_test(self, point: str) -> None:
        """TEST_PAUSE_ENV=after_save (or after_announce): the first time the process reaches that point it
        logs ``test hook: paused at <point>`` and waits there until it is killed."""
        if os.environ.get(TEST_PAUSE_ENV) != point or point in self._paused:
            return
        self._paused.add(point)
        log.warning("test hook: paused at %s (version %s, pid %d)", point, self.learner.version, os.getpid())
        while not self.stopping:
            time.sleep(0.05)
