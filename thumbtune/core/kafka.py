"""Kafka clients as thumbtune builds them: bootstrap parsing, producers, consumers, the admin client,
consumer-group timing, topic creation, and the thread that follows a topic (`TopicFollower`). Every
Kafka client of the server and the learner is made here, so connection settings (servers, TLS, SASL:
`connection_config`) have one home, and `preflight` turns a TLS misconfiguration into a clear error at
start-up instead of clients that retry a failing handshake forever.

What we measured against Tansu 0.6.0 (the embedded broker, thumbtune/cli/broker.py) with kafka-python
3.0.12, and why the defaults below are what they are:

* A consumer-group join completes after about ``session_timeout_ms / 2``. kafka-python 3's default session
  timeout is 45 s, so a default consumer waits ~23 s for its first record; with ``session_timeout_ms=6000``
  (the smallest Apache Kafka accepts by default) it is ~3 s: `consumer_group_config`. Manual ``assign()``
  without a group is immediate.
* While a heartbeat is awaiting its response past ``heartbeat_interval_ms`` (a frozen or partitioned broker),
  kafka-python caps the consumer's fetch wait at the time to the next heartbeat, which is then 0: poll()
  spins (about 1000 fetch waits a second, a whole core) and each spin hangs another callback chain on the
  in-flight fetch, about 5 kB, freed only when that fetch ends (request_timeout_ms): with the server's three
  consumers, a 30 s pause of the broker held ~150 MB of them (bench soak: a lasting RSS step). Apache
  Kafka's Java client had the same bug (KAFKA-21031) and fixed it by waiting the retry back-off instead;
  `_HeartbeatInFlight` does that for every group consumer made here.
* A producer that sends to a missing topic gets it auto-created with 4 partitions even with
  ``allow_auto_create_topics=False``, so `ensure_topics` runs before clients connect.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.coordinator.heartbeat import Heartbeat
from kafka.errors import KafkaError, TopicAlreadyExistsError

from thumbtune.core.contract import ADAPTERS_TOPIC, CONTROL_TOPIC, FEEDBACK_TOPIC
from thumbtune.core.settings import Settings

log = logging.getLogger(__name__)


def bootstrap_servers(servers: str) -> list[str]:
    """'a:9092, b:9092' -> ['a:9092', 'b:9092'] (THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS); ValueError if empty."""
    parsed = [s.strip() for s in servers.split(",") if s.strip()]
    if not parsed:
        raise ValueError(
            f"THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS={servers!r} names no server: give host:port[,host:port...]"
        )
    return parsed


def tls_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context every client wraps its broker connections in: TLS 1.2+, the brokers' certificates
    checked against THUMBTUNE_KAFKA_SSL_CAFILE (else the system's CAs), and the client certificate for
    mutual TLS when one is configured. kafka-python's own defaults, built once here so `preflight` tests
    exactly what the clients will use."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = settings.kafka_ssl_check_hostname
    if settings.kafka_ssl_cafile is not None:
        ctx.load_verify_locations(cafile=str(settings.kafka_ssl_cafile))
    else:
        ctx.load_default_certs()
    if settings.kafka_ssl_certfile is not None:
        password = settings.kafka_ssl_password
        ctx.load_cert_chain(
            str(settings.kafka_ssl_certfile),
            None if settings.kafka_ssl_keyfile is None else str(settings.kafka_ssl_keyfile),
            None if password is None else password.get_secret_value(),
        )
    return ctx


def connection_config(settings: Settings) -> dict[str, Any]:
    """The keyword arguments every KafkaProducer, KafkaConsumer and KafkaAdminClient gets: the servers and
    the security settings (THUMBTUNE_KAFKA_SECURITY_PROTOCOL and its TLS and SASL companions)."""
    protocol = settings.kafka_security_protocol
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers(settings.kafka_bootstrap_servers),
        "security_protocol": protocol,
    }
    if protocol.endswith("SSL"):
        config["ssl_context"] = tls_context(settings)
    if protocol.startswith("SASL_"):
        assert settings.kafka_sasl_password is not None  # Settings checks it
        config |= {
            "sasl_mechanism": settings.kafka_sasl_mechanism,
            "sasl_plain_username": settings.kafka_sasl_username,
            "sasl_plain_password": settings.kafka_sasl_password.get_secret_value(),
        }
    return config


class KafkaSecurityError(RuntimeError):
    """The brokers answer, but not with the configured security: a setting to fix, not an outage."""


def _host_port(server: str) -> tuple[str, int]:
    host, _, port = server.rpartition(":") if ":" in server else (server, "", "9092")
    return host.strip("[]"), int(port)


def preflight(settings: Settings, timeout: float = 5.0) -> None:
    """At start-up, with TLS configured: a TLS handshake with the first bootstrap server that accepts a TCP
    connection, using the clients' own `tls_context`. A certificate the CA does not vouch for, a wrong host
    name, or a peer that does not speak TLS (it closes, or does not answer within ``timeout``) raises
    `KafkaSecurityError` naming the server and the setting to look at. Servers that refuse the connection
    itself are left to the clients' retries (an outage passes; chat keeps spooling ratings)."""
    if not settings.kafka_security_protocol.endswith("SSL"):
        return
    ctx = tls_context(settings)
    for server in bootstrap_servers(settings.kafka_bootstrap_servers):
        host, port = _host_port(server)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError:
            continue
        try:
            with ctx.wrap_socket(sock, server_hostname=host):
                return
        except ssl.SSLCertVerificationError as exc:
            raise KafkaSecurityError(
                f"Kafka at {server}: its TLS certificate failed verification ({exc.verify_message}). Check "
                f"THUMBTUNE_KAFKA_SSL_CAFILE (now {settings.kafka_ssl_cafile or 'the system CAs'}) names "
                "the CA that signed the brokers' certificates"
                + ("" if not settings.kafka_ssl_check_hostname else ", and that they name this host")
            ) from exc
        except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
            raise KafkaSecurityError(
                f"Kafka at {server}: the TLS handshake failed ({type(exc).__name__}: {exc or 'no answer'}). "
                f"Is THUMBTUNE_KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol} what this listener "
                "speaks, and does it accept the client certificate (THUMBTUNE_KAFKA_SSL_CERTFILE)?"
            ) from exc
        finally:
            sock.close()


def topic_partitions(settings: Settings) -> dict[str, int]:
    """thumbtune's topics and the partitions they get when thumbtune creates them."""
    return {
        FEEDBACK_TOPIC: settings.feedback_partitions,
        ADAPTERS_TOPIC: settings.adapters_partitions,
        CONTROL_TOPIC: 1,  # one order of decisions for every replica
    }


TOPIC_CONFIGS = {CONTROL_TOPIC: {"retention.ms": "-1", "retention.bytes": "-1"}}
"""Topic settings thumbtune asks for when it creates a topic: the control log is the cluster's state, so it
is never deleted (on a cluster whose topics are made by an operator, give thumbtune.control the same)."""


def consumer_group_config(settings: Settings) -> dict[str, int]:
    """KafkaConsumer keyword arguments that make group joins fast on Tansu and valid on Kafka.

    Joins on Tansu take about session_timeout_ms / 2; 6000 ms is the smallest session timeout Apache Kafka
    accepts by default (group.min.session.timeout.ms). kafka-python heartbeats from a background thread,
    so a short session timeout only bounds crash detection; long gaps between polls are governed by
    max_poll_interval_ms.
    """
    return {
        "max_poll_interval_ms": settings.kafka_max_poll_interval_ms,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 2000,
    }


class _HeartbeatInFlight(Heartbeat):
    """kafka-python's heartbeat timer, except that while a heartbeat request awaits its response the time to
    the next heartbeat is at least the retry back-off, never 0 (no second heartbeat can be sent before the
    first one ends anyway). The consumer's poll loop waits on fetches for at most that long, so with a broker
    that stops answering it now wakes every ``retry_backoff_ms`` instead of spinning (KAFKA-21031's fix).

    A heartbeat awaits its response when it was sent after the last response and the last reset, and has
    not failed: kafka-python's own bookkeeping (sent_heartbeat, received_heartbeat, fail_heartbeat,
    reset_timeouts).
    """

    def time_to_next_heartbeat(self) -> float:
        due = super().time_to_next_heartbeat()
        awaiting = not self.heartbeat_failed and self.last_send > max(self.last_receive, self.last_reset)
        return max(due, self.config["retry_backoff_ms"] / 1000) if awaiting else due


def make_producer(settings: Settings, client_id: str, **options: Any) -> KafkaProducer:
    """A producer for the configured cluster; ``options`` are KafkaProducer's own (acks, retries, ...)."""
    return KafkaProducer(client_id=client_id, **connection_config(settings), **options)


def close_producer(producer: KafkaProducer, timeout: float) -> None:
    """Close ``producer`` even with records still pending. kafka-python's close() raises (flush timed out)
    before it force-closes the sender and never marks itself closed, so its non-daemon sender thread would
    outlive us and its __del__ would raise again at garbage collection; here the sender is force-closed and
    the producer marked closed."""
    try:
        producer.close(timeout=timeout)
    except Exception:  # noqa: BLE001 - whatever went wrong, the producer must end here
        sender = getattr(producer, "_sender", None)
        if sender is not None:
            with contextlib.suppress(Exception):
                sender.force_close()
                sender.join(timeout)
        producer._closed = True  # its __del__ closes again unless marked; it has no public way to say so


def make_consumer(
    settings: Settings, client_id: str, *, group_id: str | None, **options: Any
) -> KafkaConsumer:
    """A consumer for the configured cluster: in ``group_id`` (with `consumer_group_config`'s timing, which
    ``options`` may override) or, with ``group_id=None``, for manual assignment."""
    group = consumer_group_config(settings) if group_id is not None else {}
    consumer = KafkaConsumer(
        **connection_config(settings),
        client_id=client_id,
        group_id=group_id,
        enable_auto_commit=False,
        **(group | options),
    )
    if group_id is not None:
        # The same object (its metrics hold it too), with the in-flight-aware timer: see _HeartbeatInFlight.
        consumer._coordinator.heartbeat.__class__ = _HeartbeatInFlight
    return consumer


def make_admin(bootstrap: str, timeout_ms: int, settings: Settings | None = None) -> KafkaAdminClient:
    """An admin client for ``bootstrap`` with ``settings``' security (None: plaintext, e.g. the embedded
    broker)."""
    security = {} if settings is None else connection_config(settings)
    return KafkaAdminClient(
        **(security | {"bootstrap_servers": bootstrap_servers(bootstrap)}),
        request_timeout_ms=timeout_ms,
        bootstrap_timeout_ms=timeout_ms,
        client_id="thumbtune-admin",
    )


def reachable(servers: list[str], timeout: float = 0.5) -> bool:
    """Whether any bootstrap server accepts a TCP connection.

    Cheap to ask before building a KafkaProducer, whose constructor blocks for its whole bootstrap timeout
    (and logs every refused retry) when nothing listens.
    """
    for server in servers:
        try:
            socket.create_connection(_host_port(server), timeout=timeout).close()
            return True
        except (OSError, ValueError):
            continue
    return False


def ensure_topics(
    bootstrap: str,
    partitions: dict[str, int],
    timeout: float = 30,
    replication_factor: int = 1,
    settings: Settings | None = None,
) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are. ``settings``: the
    connection's security (None: plaintext).

    Retries while the broker is still coming up, so it can run right after a broker starts. Raises
    RuntimeError naming the topics and the last error once ``timeout`` has passed, or at once when the
    broker refuses the request itself (bad partition count, replication factor).
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            admin = make_admin(bootstrap, max(1000, min(10_000, int(timeout * 1000))), settings)
            try:
                missing = [t for t in partitions if t not in set(admin.list_topics())]
                for topic in missing:
                    try:
                        admin.create_topics(
                            [
                                NewTopic(
                                    topic,
                                    partitions[topic],
                                    replication_factor,
                                    topic_configs=TOPIC_CONFIGS.get(topic),
                                )
                            ]
                        )
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


class TopicFollower:
    """A daemon thread that follows a topic for as long as it runs, whatever Kafka does: the one loop every
    follower of thumbtune's topics shares (the server's of adapters, control and feedback; the learner's
    of control).

        until stopped:
            consumer = connect()           # the subclass: a consumer, subscribed or assigned and positioned
            on_connect(consumer)           # the subclass: replay, say hello, ...; then the back-off resets
            until stopped: on_records(consumer.poll(poll_ms))
          on any failure: on_failure(exc), wait (0.5 s, doubling up to 30 s), and connect again
          always: close the consumer without committing, then on_close()

    Kafka never takes its caller down: a failure is logged, kept in ``last_error`` and retried.
    """

    topic: str = ""
    """For logs."""
    thread_name: str = "thumbtune-follower"
    poll_ms = 200
    first_backoff_s, max_backoff_s = 0.5, 30.0
    close_timeout_ms: int | None = None
    """How long closing may wait (leaving a group); None: kafka-python's default."""

    def __init__(self) -> None:
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def connect(self) -> KafkaConsumer:
        raise NotImplementedError

    def on_connect(self, consumer: KafkaConsumer) -> None:
        """Called once per connection, before the first poll."""

    def on_records(self, polled: dict[Any, list[Any]]) -> None:
        """Called after every poll with what it returned ({TopicPartition: [ConsumerRecord]}, maybe empty)."""
        raise NotImplementedError

    def on_failure(self, exc: Exception) -> None:
        """Called when connecting or following failed, before the back-off."""

    def on_close(self) -> None:
        """Called after the consumer of a connection is closed (other clients of the connection, if any)."""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Stop following; a thread still waiting on an unreachable broker finishes on its own (daemon)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        backoff = self.first_backoff_s
        while not self._stop.is_set():
            consumer = None
            try:
                consumer = self.connect()
                self.on_connect(consumer)
                self.last_error, backoff = None, self.first_backoff_s
                while not self._stop.is_set():
                    self.on_records(consumer.poll(timeout_ms=self.poll_ms))
            except Exception as exc:  # noqa: BLE001 - Kafka (or a record's handling) failed: retry
                self.last_error = repr(exc)
                log.warning("following %s failed (%r); retrying in %.1f s", self.topic, exc, backoff)
                self.on_failure(exc)
                self._stop.wait(backoff)
                backoff = min(2 * backoff, self.max_backoff_s)
            finally:
                if consumer is not None:
                    try:
                        if self.close_timeout_ms is None:
                            consumer.close(autocommit=False)
                        else:
                            consumer.close(autocommit=False, timeout_ms=self.close_timeout_ms)
                    except Exception:  # noqa: BLE001 - closing after a failure: nothing more to do
                        log.debug("closing a %s consumer failed", self.topic, exc_info=True)
                self.on_close()
