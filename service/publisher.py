"""Feedback delivery to Kafka that never takes chat down.

Every event is first appended to a bounded on-disk spool (``service.spool``: SQLite, WAL mode)
and only then, by a background thread, sent to Kafka. ``publish()`` therefore costs one local
SQLite insert (tens of microseconds) whatever Kafka is doing; an unreachable broker only makes
the spool grow, and past ``settings.spool_max_events`` feedback is refused with
:class:`SpoolFull`, which the HTTP layer turns into 503 + Retry-After.

Delivery guarantees:

* Nothing is lost up to the cap: a row is deleted only after Kafka acknowledged it
  (``acks='all'``), and rows survive a process restart (see ``service.spool``).
* Order: rows are sent in spool order, and one key always maps to one partition, so per-key
  order holds. After a partial failure only the unacknowledged rows are re-sent, so a failed
  row can land after a later row of the same partition.
* No duplicates in the normal path (idempotent producer, one send per row), nor when the broker
  stalls: the producer's own retries keep its producer id and sequence numbers for up to
  ``_DELIVERY_TIMEOUT_MS`` (Kafka's default, 2 minutes), so Kafka drops the copies of a request it
  got before it stalled. Only a send that fails outright (a stall longer than that, a broker that
  forgot the producer) is re-sent by a new producer, and a row whose ack was lost then arrives twice;
  so does one whose process died between the ack and the delete. Consumers deduplicate on
  ``FeedbackEvent.event_id``.
* Rows Kafka will never take (too large, invalid topic, not authorised) go to the spool's
  ``dead_letter`` table with the error, so one bad row cannot block the rest. An event larger than
  Kafka takes is refused before it is spooled (:class:`EventTooLarge`: the HTTP layer answers 413).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Self

from kafka import KafkaProducer
from kafka.errors import (
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
)

from service import metrics
from service.spool import Row, Spool, SpoolFull
from thumbtune.core.kafka import bootstrap_servers, close_producer, make_producer, reachable
from thumbtune.core.settings import Settings

__all__ = ["EventTooLarge", "FeedbackPublisher", "SpoolFull"]

log = logging.getLogger(__name__)

_BATCH = 500
_CHECKPOINT_EVERY_S = 1.0
_MIN_BACKOFF_S = 0.25
_MAX_BACKOFF_S = 2.0
_MAX_EVENT_BYTES = 1_000_000  # Kafka's default message.max.bytes is ~1 MB
# A send not acknowledged by then fails, and its row is re-sent by a new producer, which can duplicate it;
# until then the producer retries it itself, with the same producer id and sequence number, which Kafka
# deduplicates. 10 s here duplicated a rating after a 30 s broker freeze (bench soak); Kafka's default
# outlasts such stalls.
_DELIVERY_TIMEOUT_MS = 120_000
_UNANSWERED_S = 5.0  # a send unanswered this long marks the broker down (readiness, metrics) while it waits
_BLOCK_MS = 2000  # the longest one Kafka call may block the drain thread (bootstrap, metadata)
_JOIN_GRACE_S = _BLOCK_MS / 1000 + 1
# Errors about one record rather than the connection: retrying them forever would block the spool.
_POISON = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    InvalidTopicError,
    TopicAuthorizationFailedError,
)


class EventTooLarge(ValueError):
    """An event larger than Kafka takes: it can never be delivered, so it is not spooled (answer 413)."""


class FeedbackPublisher:
    """Spool-then-send publisher for feedback events; see the module docstring for guarantees.

    ``publish`` is safe to call from many threads. ``start`` opens the spool and starts the
    drain thread; ``close`` sends what it can within its timeout and stops (the rest stays on
    disk for the next start).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.spool = Spool(settings.spool_path, settings.spool_max_events)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._producer: KafkaProducer | None = None
        self._broker_up: bool | None = None  # None: not tried yet
        self._bootstrap = bootstrap_servers(settings.kafka_bootstrap_servers)

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Open (or recover) the spool and start draining it; a no-op when already started."""
        if self._thread is not None:
            return
        self.spool.open()
        metrics.SPOOL_DEPTH.set(self.spool.depth)
        metrics.BROKER_UP.set(0)
        if self.spool.depth:
            log.info(
                "feedback spool %s holds %d events from an earlier run; sending them",
                self.spool.path,
                self.spool.depth,
            )
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="feedback-publisher", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10) -> None:
        """Send what can be sent within ``timeout`` seconds, then stop; the rest stays spooled."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(max(0.0, deadline - time.monotonic()) + _JOIN_GRACE_S)
        if self._thread.is_alive():
            log.warning("feedback publisher thread did not stop in time; unsent events stay spooled")
            return
        self._thread = None
        if self.spool.depth:
            log.warning(
                "%d feedback events stay spooled in %s until the next start",
                self.spool.depth,
                self.spool.path,
            )
        self.spool.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the fast path -----------------------------------------------------------------------------

    @staticmethod
    def check(key: bytes, value: bytes) -> None:
        """Raise what `publish` would for this record before it touches the spool: EventTooLarge for an
        event larger than Kafka accepts (answer 413), TypeError for anything but bytes."""
        if not isinstance(key, bytes) or not isinstance(value, bytes):
            raise TypeError("publish() takes bytes key and value; use FeedbackEvent.key() / to_bytes()")
        if len(key) + len(value) > _MAX_EVENT_BYTES:
            size = len(key) + len(value)
            raise EventTooLarge(f"the event is {size} bytes; Kafka takes at most {_MAX_EVENT_BYTES}")

    def publish(self, topic: str, key: bytes, value: bytes) -> None:
        """Append one event to the spool for the drain thread to send. Never touches Kafka.

        Raises SpoolFull when the spool holds ``spool_max_events`` or cannot be written, and what
        `check` raises.
        """
        self.check(key, value)
        try:
            self.spool.append(topic, key, value)
        except SpoolFull:
            metrics.SPOOL_REJECTED.inc()
            raise
        metrics.SPOOL_DEPTH.set(self.spool.depth)
        self._wake.set()

    # --- observation -------------------------------------------------------------------------------

    def depth(self) -> int:
        """Events waiting in the spool (not yet acknowledged by Kafka)."""
        return self.spool.depth

    @property
    def broker_up(self) -> bool:
        """Whether the last attempt to reach Kafka (connect or send) succeeded."""
        return bool(self._broker_up)

    def flush(self, timeout: float) -> bool:
        """Wait until the spool is empty; True if it is, False after ``timeout`` seconds."""
        if self._thread is None or not self._thread.is_alive():
            return self.spool.depth == 0
        return self.spool.wait_empty(timeout)

    # --- the drain thread --------------------------------------------------------------------------

    def _set_broker_up(self, up: bool) -> None:
        if up != self._broker_up:
            where = ",".join(self._bootstrap)
            if up:
                log.info("Kafka at %s reachable; %d spooled events to send", where, self.spool.depth)
            else:
                log.warning(
                    "Kafka at %s unreachable; feedback waits in %s (%d events) until it is back",
                    where,
                    self.spool.path,
                    self.spool.depth,
                )
        self._broker_up = up
        metrics.BROKER_UP.set(1 if up else 0)

    def _run(self) -> None:
        backoff = _MIN_BACKOFF_S
        checkpointed = time.monotonic()
        while not self._stop.is_set():
            try:
                ok = self._step()
                if time.monotonic() - checkpointed > _CHECKPOINT_EVERY_S:
                    self.spool.checkpoint()  # here, not in publish(): appends stay fast
                    checkpointed = time.monotonic()
            except Exception:  # a disk hiccup must not end delivery for good: log, back off, retry
                log.exception("feedback publisher: unexpected error; events stay spooled, retrying")
                self._drop_producer()
                ok = False
            if ok or self._stop.is_set():
                backoff = _MIN_BACKOFF_S
                continue
            self._stop.wait(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)
        self._drop_producer()

    def _step(self) -> bool:
        """One round: (re)connect if needed, then send one batch. False means back off."""
        if self._producer is None and not self._connect():
            if self.spool.depth:
                metrics.PUBLISH_ERRORS.inc()
            return False
        self._wake.clear()
        rows = self.spool.head(_BATCH)
        if not rows:
            self._wake.wait(1.0)
            return True
        if self._send(rows) or self._stop.is_set():
            return True
        metrics.PUBLISH_ERRORS.inc()
        self._drop_producer()
        return False

    def _connect(self) -> bool:
        """Create the producer; created lazily so a broker that is down at start costs nothing."""
        if not reachable(self._bootstrap):
            self._set_broker_up(False)
            return False
        try:
            self._producer = make_producer(
                self.settings,
                "thumbtune-feedback",
                acks="all",
                # Idempotence works on Tansu 0.6 (measured, see thumbtune/cli/broker.py): no duplicates from
                # the producer's own retries, and order kept with up to 5 requests in flight.
                enable_idempotence=True,  # retries: unbounded within delivery_timeout_ms (the default)
                request_timeout_ms=5000,
                delivery_timeout_ms=_DELIVERY_TIMEOUT_MS,
                max_block_ms=_BLOCK_MS,
                bootstrap_timeout_ms=_BLOCK_MS,
                reconnect_backoff_max_ms=1000,
                batch_size=256 * 1024,  # a drained backlog goes out in few requests
                allow_auto_create_topics=False,
            )
        except (KafkaError, OSError) as exc:
            log.debug("cannot connect to Kafka at %s: %r", self._bootstrap, exc)
            self._set_broker_up(False)
            return False
        self._set_broker_up(True)
        return True

    def _drop_producer(self) -> None:
        """Forget the producer after any failure. Why: an idempotent producer whose broker lost its
        producer id (a restarted in-memory broker) fails every later send; a new one starts clean."""
        producer, self._producer = self._producer, None
        if producer is not None:
            close_producer(producer, timeout=1.0)

    def _send(self, rows: list[Row]) -> bool:
        """Send rows in order, wait for their acks, retire the acked ones. True if all went."""
        producer = self._producer
        assert producer is not None
        sent: list[tuple[Row, Any]] = []
        poison: list[tuple[Row, str]] = []
        failed = False
        for row in rows:
            if self._stop.is_set():
                break
            try:
                sent.append((row, producer.send(row[1], key=row[2], value=row[3])))
            except _POISON as exc:
                poison.append((row, repr(exc)))
            except KafkaError as exc:  # metadata unavailable (broker gone, topic missing) or buffer full
                log.debug("sending to %s failed: %r", row[1], exc)
                failed = True
                break
        self._await(producer, [fut for _, fut in sent])
        delivered: list[int] = []
        for row, fut in sent:
            if fut.is_done and fut.succeeded():
                delivered.append(row[0])
            elif fut.is_done and isinstance(fut.exception, _POISON):
                poison.append((row, repr(fut.exception)))
            else:
                failed = True
        self.spool.retire(delivered, poison)
        metrics.SPOOL_DEPTH.set(self.spool.depth)
        metrics.EVENTS_PUBLISHED.inc(len(delivered))
        if poison:
            metrics.PUBLISH_ERRORS.inc(len(poison))
        if delivered:
            self._set_broker_up(True)
        if failed:
            self._set_broker_up(False)
        return not failed and len(delivered) + len(poison) == len(rows)

    def _await(self, producer: KafkaProducer, futures: list[Any]) -> None:
        """Wait for the sends to complete, in short slices so that close() can cut it short."""
        started = time.monotonic()
        deadline = started + _DELIVERY_TIMEOUT_MS / 1000 + 2  # every future has ended by then
        while any(not f.is_done for f in futures) and time.monotonic() < deadline and not self._stop.is_set():
            if self._broker_up and time.monotonic() - started > _UNANSWERED_S:
                self._set_broker_up(False)  # still retrying, but readiness and metrics say it is away
            with contextlib.suppress(KafkaError):  # KafkaTimeoutError: not yet; others show on the futures
                producer.flush(timeout=0.2)
