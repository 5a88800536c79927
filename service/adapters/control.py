"""The cluster's control plane: decisions about adapter versions on thumbtune.control, applied by every
replica in the log's order, so every replica converges on one state.

A decision (`ControlRecord`: pin, unpin, rollback, refuse) is validated by the replica that took the
admin call (`AdapterManager.plan`: a rollback's target is resolved there, so every replica goes to the
same version), appended to the one partition of ``thumbtune.control``, and applied by each replica when
it reads it, its own included. Each replica then appends a receipt (`ControlAck`) saying whether it could
apply it and what it serves now. The admin call answers once its own replica has applied the decision,
after waiting up to ``THUMBTUNE_CONTROL_CONFIRM_S`` for the receipts of the other replicas it knows of.

The log is the state. A replica that starts reads it from the beginning (`replay`) and folds every
decision in (`AdapterManager.restore`) before start-up loads anything, so a restarted replica comes up
pinned where the cluster is pinned and never serves a refused version. Replicas say when they join and
leave, and what goes live on them whatever made it (receipts without a decision: the learner reads them,
learner/control.py `Serving`); a replica that crashed stays on the list, unconfirmed, until it
comes back under its name (``THUMBTUNE_REPLICA_ID``; by default host name and process id, which in a
container is the pod's name and 1).

A refusal by a replica's own admission checks is a decision too (actor ``checks``), so a version one
replica refuses is refused everywhere. Kafka never takes chat down: while the broker is unreachable the
thread retries with backoff, serving goes on with what is live, admin calls answer 503, and on
reconnection the replica goes on from where it stopped reading.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from service import metrics
from service.adapters import decisions
from service.adapters.admission import COMMAND_TIMEOUT_S, EngineUnavailable
from service.adapters.manager import AdapterManager, UnknownVersion, VersionConflict
from service.protocol_admin import ControlView, DecisionView
from thumbtune.core.contract import CONTROL_TOPIC, ControlAck, ControlAction, ControlRecord, parse_control
from thumbtune.core.kafka import (
    TopicFollower,
    bootstrap_servers,
    close_producer,
    make_consumer,
    make_producer,
    reachable,
)
from thumbtune.core.settings import Settings

log = logging.getLogger(__name__)

POLL_MS = 100
SEND_TIMEOUT_S = 10.0
BOOTSTRAP_MS = 2000
PARTITION = TopicPartition(CONTROL_TOPIC, 0)
APPLY_ERRORS = (VersionConflict, UnknownVersion, EngineUnavailable, TimeoutError)
"""What applying a decision may raise on one replica; anything else is a bug and takes the thread round."""


# Every decision counter starts at 0, so an alert on increase() sees the first one too.
for _action in ControlAction:
    for _actor in ("admin", "checks", "canary"):
        for _outcome in ("applied", "ignored", "failed"):
            metrics.CONTROL_DECISIONS.labels(_action.value, _actor, _outcome)


class ControlUnavailable(RuntimeError):
    """thumbtune.control cannot be reached: the decision was not taken."""


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class _Waiter:
    """An admin call waiting for its decision: applied here (``done``), and the other replicas' receipts."""

    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    live: str = ""
    acks: dict[str, ControlAck] = field(default_factory=dict)


class ControlPlane(TopicFollower):
    topic, thread_name, poll_ms = CONTROL_TOPIC, "thumbtune-control", POLL_MS

    def __init__(self, settings: Settings, manager: AdapterManager, replica: str | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.manager = manager
        self.replica = replica or settings.replica_id or default_replica_id()
        self.position = 0
        """The next offset of thumbtune.control to read."""
        self.replayed = False
        self.applied = 0
        self.connected = threading.Event()
        self.replicas: dict[str, float] = {}
        """Other replicas that joined and have not left: name -> when they were last heard from."""
        self._cond = threading.Condition()
        self._waiters: dict[str, _Waiter] = {}
        self._producer: KafkaProducer | None = None
        self._unsent: list[ControlRecord] = []
        manager.on_refused = self._refused_by_checks
        manager.on_candidate = self._candidate
        manager.on_live = self._went_live
        metrics.CONTROL_CONNECTED.labels(self.replica).set(0)

    # --- start-up, the thread, shutdown -----------------------------------------------------------------

    def replay(self, timeout: float) -> bool:
        """Read the whole log and fold it into the manager (nothing is loaded); False if Kafka did not
        answer in time (the thread replays once it connects, and reconciles what is live then)."""
        consumer = None
        try:
            if not reachable(bootstrap_servers(self.settings.kafka_bootstrap_servers)):
                raise OSError(f"no broker of {self.settings.kafka_bootstrap_servers} accepts connections")
            consumer = self.connect()
            self._read_to_end(consumer, time.monotonic() + timeout)
        except (KafkaError, OSError, TimeoutError) as exc:
            self.last_error = repr(exc)
            log.warning("could not read %s at start-up (%r); serving what the store has", CONTROL_TOPIC, exc)
            return False
        finally:
            if consumer is not None:
                consumer.close(autocommit=False)
        self.replayed = True
        log.info("%s replayed: %d records, pinned %s", CONTROL_TOPIC, self.position, self.manager.pinned)
        return True

    def stop(self, timeout: float = 3.0) -> None:
        """Say this replica is leaving (best effort), stop reading."""
        producer = self._producer
        if producer is not None and self.connected.is_set():
            try:
                self._send(self._ack(None, True, leaving=True), wait=1.0)
            except ControlUnavailable:
                log.debug("could not say goodbye on %s", CONTROL_TOPIC)
        super().stop(timeout)

    def connect(self) -> KafkaConsumer:
        consumer = make_consumer(
            self.settings, "thumbtune-server-control", group_id=None, bootstrap_timeout_ms=BOOTSTRAP_MS
        )
        consumer.assign([PARTITION])
        consumer.seek(PARTITION, self.position)
        return consumer

    def _read_to_end(self, consumer: KafkaConsumer, deadline: float) -> None:
        end = consumer.end_offsets([PARTITION])[PARTITION]
        while self.position < end:
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {self.position} of {end} records of {CONTROL_TOPIC} in time")
            for records in consumer.poll(timeout_ms=POLL_MS).values():
                for record in records:
                    self._fold(record.value, record.offset)
                    self.position = record.offset + 1

    def on_connect(self, consumer: KafkaConsumer) -> None:
        self._producer = make_producer(self.settings, "thumbtune-server-control", acks="all")
        if not self.replayed:
            self._read_to_end(consumer, float("inf"))
            self.replayed = True
            decisions.reconcile(self.manager)
        self._send(self._ack(None, True))
        for record in self._unsent:
            self._send(record)
        self._unsent.clear()
        self.connected.set()
        metrics.CONTROL_CONNECTED.labels(self.replica).set(1)

    def on_records(self, polled: dict) -> None:
        for records in polled.values():
            for record in records:
                self._handle(record.value, record.offset)
                self.position = record.offset + 1

    def on_failure(self, exc: Exception) -> None:
        self.connected.clear()
        metrics.CONTROL_CONNECTED.labels(self.replica).set(0)

    def on_close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            close_producer(producer, timeout=1)

    # --- reading the log --------------------------------------------------------------------------------

    def _parse(self, value: bytes, offset: int) -> ControlRecord | ControlAck | None:
        try:
            return parse_control(value)
        except ValueError:
            log.warning("ignoring a malformed record on %s at offset %d", CONTROL_TOPIC, offset)
            return None

    def _fold(self, value: bytes, offset: int) -> None:
        """A record from before this replica started: remember it, load nothing."""
        record = self._parse(value, offset)
        if isinstance(record, ControlRecord):
            decisions.restore(self.manager, record)
        elif isinstance(record, ControlAck):
            self._heard(record)

    def _handle(self, value: bytes, offset: int) -> None:
        """A new record: apply a decision, and receipt it; note a receipt."""
        record = self._parse(value, offset)
        if isinstance(record, ControlAck):
            self._heard(record)
            return
        if record is None:
            return
        error: BaseException | None = None
        applies = True
        try:
            applies = decisions.apply(self.manager, record)
        except APPLY_ERRORS as exc:
            error = exc
            log.error(
                "could not apply %s %s (%s): %s", record.action.value, record.version, record.record_id, exc
            )
        live = self.manager.live
        self.applied += 1
        outcome = "failed" if error is not None else "applied" if applies else "ignored"
        metrics.CONTROL_DECISIONS.labels(record.action.value, record.actor, outcome).inc()
        log.info(
            "decision %s: %s %s by %s on %s (%s): %s; live %s",
            record.record_id,
            record.action.value,
            record.version or "",
            record.actor,
            record.replica,
            record.reason or "no reason given",
            outcome,
            live,
        )
        self.position = offset + 1
        with self._cond:
            waiter = self._waiters.get(record.record_id)
            if waiter is not None:
                waiter.error, waiter.live = error, live
                waiter.done.set()
                self._cond.notify_all()
        try:
            self._send(
                self._ack(record.record_id, error is None, error=None if error is None else str(error))
            )
        except ControlUnavailable as exc:
            log.warning("could not receipt decision %s: %s", record.record_id, exc)

    def _heard(self, ack: ControlAck) -> None:
        if ack.replica == self.replica:
            return
        with self._cond:
            if ack.leaving:
                self.replicas.pop(ack.replica, None)
            else:
                self.replicas[ack.replica] = ack.at
            waiter = self._waiters.get(ack.record_id) if ack.record_id is not None else None
            if waiter is not None:
                waiter.acks[ack.replica] = ack
                self._cond.notify_all()

    # --- writing to it ----------------------------------------------------------------------------------

    def _ack(
        self, record_id: str | None, applied: bool, error: str | None = None, leaving: bool = False
    ) -> ControlAck:
        return ControlAck(
            record_id=record_id,
            replica=self.replica,
            applied=applied,
            live=self.manager.live,
            canary=self.manager.canary,
            error=error,
            leaving=leaving,
            at=time.time(),
        )

    def _send(self, record: ControlRecord | ControlAck, wait: float = SEND_TIMEOUT_S) -> None:
        """Append ``record``; wait up to ``wait`` s for Kafka's acknowledgement (0: do not wait)."""
        producer = self._producer
        if producer is None:
            raise ControlUnavailable(f"{CONTROL_TOPIC} is unreachable ({self.last_error})")
        key = (record.record_id or self.replica).encode()
        try:
            future = producer.send(CONTROL_TOPIC, key=key, value=record.model_dump_json().encode())
            if wait > 0:
                future.get(timeout=wait)
        except KafkaError as exc:
            raise ControlUnavailable(f"could not write to {CONTROL_TOPIC}: {exc!r}") from exc

    def _refused_by_checks(self, version: str, reason: str, message: str) -> None:
        """This replica's checks refused ``version``: the cluster refuses it too."""
        self.propose(ControlAction.refuse, version, message, actor="checks", check=reason)

    def _went_live(self, version: str) -> None:
        """Say what this replica serves now (a receipt of no decision), so the learner knows (best effort:
        a decision's receipt says it again)."""
        if self.connected.is_set():
            try:
                self._send(self._ack(None, True), wait=0)
            except ControlUnavailable:
                log.debug("could not say on %s that %s is live", CONTROL_TOPIC, version)

    def _candidate(self, version: str) -> None:
        """A checked version newer than live: the cluster's next canary (several replicas may propose it;
        the first record wins, the others are ignored when applied)."""
        self.propose(ControlAction.canary, version, "passed its checks", actor="canary")

    def propose(self, action: ControlAction, version: str | None, reason: str | None, **extra: str) -> None:
        """Append a decision without waiting for it (automatic steps: checks, the canary stage)."""
        record = self._record(action, version, reason, **extra)
        try:
            self._send(record, wait=0)
        except ControlUnavailable:
            self._unsent.append(record)  # sent once the thread reconnects

    def _record(
        self, action: ControlAction, version: str | None, reason: str | None, **extra: str
    ) -> ControlRecord:
        return ControlRecord(
            record_id=uuid.uuid4().hex,
            action=action,
            version=version,
            previous=self.manager.live,
            reason=reason,
            replica=self.replica,
            issued_at=time.time(),
            **({"actor": "admin"} | extra),
        )

    def submit(
        self, action: ControlAction, version: str | None = None, reason: str | None = None
    ) -> DecisionView:
        """Decide: validate, append to the log, wait until applied here and for the other replicas' receipts.

        Raises ControlUnavailable (nothing was decided), UnknownVersion / VersionConflict before anything
        is written, or what applying it here raised (the decision is on the log then, and its message says
        so), or TimeoutError if this replica did not apply it within COMMAND_TIMEOUT_S.
        """
        if not self.connected.is_set():
            raise ControlUnavailable(
                f"{CONTROL_TOPIC} is unreachable ({self.last_error}); nothing was decided, try again"
            )
        record = self._record(action, decisions.plan(self.manager, action, version), reason)
        waiter = _Waiter()
        with self._cond:
            self._waiters[record.record_id] = waiter
        try:
            self._send(record)
            if not waiter.done.wait(COMMAND_TIMEOUT_S):
                raise TimeoutError(
                    f"decision {record.record_id} was not applied here in {COMMAND_TIMEOUT_S:.0f} s"
                )
            if waiter.error is not None:
                raise type(waiter.error)(
                    f"{waiter.error} (decision {record.record_id} is on {CONTROL_TOPIC}, but this replica "
                    "could not apply it)"
                ) from waiter.error
            deadline = time.monotonic() + self.settings.control_confirm_s
            with self._cond:
                while set(self.replicas) - set(waiter.acks) and time.monotonic() < deadline:
                    self._cond.wait(deadline - time.monotonic())
                acks, known = dict(waiter.acks), set(self.replicas)
        finally:
            with self._cond:
                self._waiters.pop(record.record_id, None)
        return DecisionView(
            record_id=record.record_id,
            action=record.action.value,
            version=record.version,
            previous=record.previous,
            replica=self.replica,
            live=waiter.live,
            confirmed={r: a.live for r, a in acks.items() if a.applied},
            failed={r: a.error or "" for r, a in acks.items() if not a.applied},
            unconfirmed=sorted(known - set(acks)),
        )

    def state(self) -> ControlView:
        return ControlView(
            replica=self.replica,
            connected=self.connected.is_set(),
            position=self.position,
            applied=self.applied,
            replicas=sorted(self.replicas),
            last_error=self.last_error,
        )
