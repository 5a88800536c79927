"""What the learner hears on ``thumbtune.control``: the versions it must not train on from.

The servers write the cluster's decisions about versions to ``thumbtune.control`` (`ControlRecord`, one
partition, kept for ever; service/adapters/control.py). The learner reads the same log, by assignment
(no consumer group), from its start, and folds into `Refusals` every version it must not continue from:

    refuse    ``version``, whoever refused it (an operator, a replica's admission checks, the canary judge)
    rollback  ``previous``, the version rolled back from

Every other decision and every malformed record is ignored (the last logged). v0, the empty adapter, is
never refused: it is where the learner falls back to when everything above it was.

The replicas' receipts (`ControlAck`: after every decision a replica applies, when it joins, and whenever
its live version changes) say what each replica serves, live and canary; `Serving` keeps the newest per
replica. Ratings of answers a version still serving gave are never dropped as stale (learner/events.py):
with canaries the live version may stay many versions behind the learner while a canary is judged, and its
ratings are most of what users give; the canary's are the freshest evidence there is.

Before each update (`Learner.train`, `Learner.refine`) the learner asks whether its head (the version its
weights are, the next version's parent) is refused; if it is, it restores the newest version in the store
that is not (`Refusals.fallback`, `learner.checkpoint.restore_version`) and trains on from there, while
the offsets stay the head's: what the refused version trained on is not trained again. The next version's
manifest names the restored version as its parent and says what it reacted to (``restored_from``); every
manifest carries the refusals known (``refused``: version -> "actor: reason"), which also seeds `Refusals`
when the learner starts, so a learner that starts while Kafka is down still knows them.

Why a thread (`ControlFollower`) and not a poll before each update: a poll in the training loop either
waits for the fetch (seconds, or its whole request timeout when the broker is slow or down) or misses
records the broker has not sent yet. A daemon thread follows the log at its own pace, reconnecting with
backoff while Kafka is down, and the update reads what it has folded so far under a lock, which never
waits on the network. At start the loop waits up to `REPLAY_WAIT_S` for the thread to read the log to its
end, so a restarted learner does not train one more version from a head refused while it was away; past
that it trains on, and the next update restores once the thread has caught up.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from kafka import KafkaConsumer, TopicPartition

from learner import metrics
from thumbtune.core.contract import (
    BASE_VERSION,
    CONTROL_TOPIC,
    AdapterManifest,
    ControlAck,
    ControlAction,
    ControlRecord,
    parse_control,
    version_number,
)
from thumbtune.core.kafka import TopicFollower, bootstrap_servers, make_consumer, reachable
from thumbtune.core.settings import Settings

log = logging.getLogger(__name__)

PARTITION = TopicPartition(CONTROL_TOPIC, 0)
"""The longest a stop request waits for the thread."""
BOOTSTRAP_MS = 2000
REPLAY_WAIT_S = 10.0
"""How long a starting learner waits for the log's replay before it trains (the broker has just answered
ensure_topics, so this is only spent when it is slow)."""
SUMMARY_CHARS = 200
"""A refusal's reason in a manifest's ``refused`` is cut to this many characters (the log has it whole)."""


@dataclass(frozen=True)
class Refusal:
    """Why the learner must not train on from ``version``."""

    version: str
    actor: str
    """Who decided: 'admin', 'checks' or 'canary' (the record's actor)."""
    reason: str
    """What the log said (a check's name first; 'rolled back to vN' for a rollback)."""

    def summary(self) -> str:
        """'actor: reason', cut to `SUMMARY_CHARS`: the value in a manifest's ``refused``."""
        text = f"{self.actor}: {self.reason}"
        return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 3] + "..."

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def of(cls, record: ControlRecord) -> Refusal | None:
        """The refusal a decision implies: a refusal's version, a rollback's previous; None otherwise."""
        if record.action is ControlAction.refuse and record.version is not None:
            reason = record.reason or "no reason given"
            return cls(record.version, record.actor, f"{record.check}: {reason}" if record.check else reason)
        if record.action is ControlAction.rollback and record.previous is not None:
            said = f": {record.reason}" if record.reason else ""
            return cls(record.previous, record.actor, f"rolled back to {record.version}{said}")
        return None


def parse(value: bytes | None, where: str) -> ControlRecord | ControlAck | None:
    """A record of the log, or None (logged) if it is malformed."""
    try:
        return parse_control(value or b"")
    except ValueError as exc:  # not JSON, not UTF-8, neither kind, or a field that does not validate
        log.warning("skipping %s: not a control record (%s)", where, " ".join(str(exc).split())[:300])
        return None


class Serving:
    """The live version and the canary of every replica that has said so on the log and not left (its
    newest receipt).

    A replica that crashed without saying goodbye stays until it comes back under its name; its version
    then only keeps exempting ratings that version gave, which still carry their importance weights.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._serves: dict[str, frozenset[str]] = {}

    def take(self, record: ControlRecord | ControlAck | None) -> None:
        if not isinstance(record, ControlAck):
            return
        with self._lock:
            if record.leaving:
                self._serves.pop(record.replica, None)
            else:
                self._serves[record.replica] = frozenset({record.live} | ({record.canary} - {None}))

    def versions(self) -> frozenset[str]:
        """The versions some replica serves now, live or canary (none known: empty)."""
        with self._lock:
            return frozenset().union(*self._serves.values())


class Refusals:
    """The versions the learner must not continue from, with why; shared by the thread that folds the log
    in (`fold`) and the updates that read it (`get`, `fallback`, `summary`)."""

    def __init__(self, known: Iterable[Refusal] = ()) -> None:
        self._lock = threading.Lock()
        self._known: dict[str, Refusal] = {}
        for refusal in known:
            self.add(refusal)
        metrics.REFUSED_VERSIONS.set(len(self._known))

    @classmethod
    def from_manifest(cls, manifest: AdapterManifest | None) -> Refusals:
        """The refusals a manifest recorded (``refused``: version -> 'actor: reason')."""
        recorded = (manifest.model_extra or {}).get("refused", {}) if manifest is not None else {}
        if not isinstance(recorded, dict):
            log.warning("%s's refused is not a mapping (%r); ignoring it", manifest.version, recorded)
            return cls()
        known = []
        for version, summary in recorded.items():
            actor, _, reason = str(summary).partition(": ")
            known.append(Refusal(str(version), actor, reason))
        return cls(known)

    def add(self, refusal: Refusal) -> bool:
        """Remember ``refusal`` unless the version is already known (the first word stays) or is v0, or not
        a version name; True if it is new."""
        try:
            version_number(refusal.version)
        except ValueError:
            log.warning("ignoring a refusal of %r: not a version name", refusal.version)
            return False
        if refusal.version == BASE_VERSION:
            log.info("ignoring a refusal of %s (%s): the empty adapter is the floor", BASE_VERSION, refusal)
            return False
        with self._lock:
            if refusal.version in self._known:
                return False
            self._known[refusal.version] = refusal
            metrics.REFUSED_VERSIONS.set(len(self._known))
        return True

    def fold(self, value: bytes | None, where: str) -> Refusal | None:
        """One record of the log; the refusal it adds, if any. Malformed records are logged and skipped."""
        return self.take(parse(value, where), where)

    def take(self, record: ControlRecord | ControlAck | None, where: str) -> Refusal | None:
        """The refusal a parsed record adds, if any."""
        if not isinstance(record, ControlRecord):
            return None
        refusal = Refusal.of(record)
        if refusal is None or not self.add(refusal):
            return None
        log.info("%s: %s is refused for training on from (%s)", where, refusal.version, refusal.summary())
        return refusal

    def get(self, version: str) -> Refusal | None:
        with self._lock:
            return self._known.get(version)

    def __contains__(self, version: object) -> bool:
        with self._lock:
            return version in self._known

    def __len__(self) -> int:
        with self._lock:
            return len(self._known)

    def summary(self) -> dict[str, str]:
        """version -> 'actor: reason', oldest version first: a manifest's ``refused``."""
        with self._lock:
            known = sorted(self._known.values(), key=lambda r: version_number(r.version))
        return {r.version: r.summary() for r in known}

    def fallback(self, versions: Iterable[str]) -> list[str]:
        """Where to go back to, best first: the versions not refused, newest first, then v0 (always last).

        With one learner writing the store this is an ancestor of the refused head: everything newer than
        the version a restore went to was refused then, so a branch abandoned holds refused versions only.
        """
        with self._lock:
            allowed = [v for v in versions if v not in self._known and v != BASE_VERSION]
        return sorted(allowed, key=version_number, reverse=True) + [BASE_VERSION]


def restored(refusal: Refusal, target: str) -> None:
    """Say (WARNING) and count that the learner left the refused head ``refusal.version`` for ``target``."""
    log.warning(
        "%s was refused (%s): training on from %s instead; the offsets stay %s's",
        refusal.version,
        refusal.summary(),
        target,
        refusal.version,
    )
    metrics.RESTORES.labels(actor=metrics.actor_label(refusal.actor)).inc()
    metrics.set_version(target)


class ControlFollower(TopicFollower):
    """Follows ``thumbtune.control`` from its start in a daemon thread, folding it into ``refusals`` and
    ``serving``.

    Kafka never stops training: while the broker is unreachable the thread retries with backoff (and the
    learner trains with the refusals it knows); on reconnection it goes on from where it stopped reading.
    """

    topic, thread_name = CONTROL_TOPIC, "thumbtune-learner-control"

    def __init__(self, settings: Settings, refusals: Refusals, serving: Serving | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.refusals = refusals
        self.serving = serving if serving is not None else Serving()
        self.position = 0
        """The next offset of thumbtune.control to read."""
        self.replayed = threading.Event()
        """Set once the thread has read the log up to its end offset at connection."""
        self._end = 0

    def start(self, wait_s: float = REPLAY_WAIT_S) -> bool:
        """Start following; wait up to ``wait_s`` for the replay. False if it did not finish in time."""
        super().start()
        if not self.replayed.wait(wait_s):
            log.warning(
                "%s not read to its end within %.0f s: training on with the %d refusals known so far",
                CONTROL_TOPIC,
                wait_s,
                len(self.refusals),
            )
            return False
        return True

    def connect(self) -> KafkaConsumer:
        if not reachable(bootstrap_servers(self.settings.kafka_bootstrap_servers)):
            raise OSError(f"no broker of {self.settings.kafka_bootstrap_servers} accepts connections")
        consumer = make_consumer(
            self.settings, "thumbtune-learner-control", group_id=None, bootstrap_timeout_ms=BOOTSTRAP_MS
        )
        consumer.assign([PARTITION])
        consumer.seek(PARTITION, self.position)
        self._end = consumer.end_offsets([PARTITION])[PARTITION]
        return consumer

    def on_connect(self, consumer: KafkaConsumer) -> None:
        self._check_replayed()

    def on_records(self, polled: dict) -> None:
        for records in polled.values():
            for record in records:
                where = f"{CONTROL_TOPIC}@{record.offset}"
                parsed = parse(record.value, where)
                self.refusals.take(parsed, where)
                self.serving.take(parsed)
                self.position = record.offset + 1
        self._check_replayed()

    def _check_replayed(self) -> None:
        if self.position >= self._end and not self.replayed.is_set():
            log.info("%s replayed: %d refused versions", CONTROL_TOPIC, len(self.refusals))
            self.replayed.set()
