"""Exactly once across crashes: `thumbtune learn` SIGKILLed at several points, restarted each time.

The learner runs as a subprocess on a broker of its own, over a stream of 48 rated answers (batches of 3)
plus producer retries and garbage. It is killed between saving a version and announcing it, between announcing
and committing (both made deterministic with the THUMBTUNE_LEARNER_TEST_PAUSE_AT hook), and twice at random
moments in consumption or an update; a last run is stopped with SIGTERM. The store's manifests must then
prove that every event was trained exactly once, and every version must be whole and announced. Once as
one process, once as two data-parallel ranks under torchrun (learner/distributed.py; the signals go to
torchrun and both ranks, as a pod's stop does).
"""

from __future__ import annotations

import os
import random
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.kafka import produce, read_topic
from tests.support.learner import make_events, records_of
from thumbtune.cli.broker import EmbeddedBroker
from thumbtune.cli.process import ChildProcess, free_port
from thumbtune.core.contract import ADAPTERS_TOPIC, AdapterAnnouncement
from thumbtune.core.store import LocalAdapterStore

pytestmark = [pytest.mark.broker, pytest.mark.feedback_partitions(3)]


def versions_on_disk(root: Path) -> list[str]:
    """Every v<N> directory, manifest or not (a half-written one would show up here)."""
    return sorted((p.name for p in root.iterdir() if re.fullmatch(r"v\d+", p.name)), key=lambda v: int(v[1:]))


def learn_argv(processes: int) -> list[str]:
    """`thumbtune learn`, or torchrun with ``processes`` ranks of it."""
    if processes == 1:
        return [sys.executable, "-m", "thumbtune.cli", "learn"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}"]
    return [
        *torchrun,
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        "thumbtune.cli",
        "learn",
    ]


@pytest.mark.parametrize("processes", [1, 2], ids=["1 process", "2 ranks"])
def test_every_event_is_trained_exactly_once_across_sigkills_at_any_point(
    processes: int, kafka: EmbeddedBroker, tiny_model_dir: Path, tmp_path: Path
) -> None:
    events = make_events(tiny_model_dir, tmp_path, 48, seed=3)
    records = records_of(events)
    rng = random.Random(0)
    for i in (3, 17, 30, 44):  # producer retries: the same event again, later in its partition
        records.insert(rng.randrange(i + 1, len(records)), records[i])
    records.insert(11, (b"garbage-1", b"{not json"))
    records.insert(29, (b"garbage-2", b'{"event_id": "half"}'))
    produce(kafka.bootstrap, records)

    store_path = tmp_path / "adapters"
    store = LocalAdapterStore(store_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("THUMBTUNE_")} | {
        "THUMBTUNE_MODEL": str(tiny_model_dir),
        "THUMBTUNE_CACHE_DIR": str(tmp_path / "cache"),
        "THUMBTUNE_ADAPTER_STORE": str(store_path),
        "THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
        "THUMBTUNE_LEARNER_BATCH_SIZE": "3",
        "THUMBTUNE_LEARNER_MIN_BATCH": "3",
        "THUMBTUNE_LEARNER_EPOCHS": "1",
        "THUMBTUNE_LEARNER_MINIBATCH_SIZE": "3",
        "THUMBTUNE_LEARNER_MAX_STALENESS": "1000",
        "THUMBTUNE_LEARNER_METRICS_PORT": "0",
        "THUMBTUNE_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "THUMBTUNE_LOG_LEVEL": "info",
    }
    run = 0

    def start(pause_at: str | None = None) -> ChildProcess:
        """`thumbtune learn`, its output in a file the test polls."""
        nonlocal run
        run += 1
        pause = {"THUMBTUNE_LEARNER_TEST_PAUSE_AT": pause_at} if pause_at else {}
        log = tmp_path / f"learner-{run}.log"
        return ChildProcess(
            f"learner run {run}", learn_argv(processes), env=env | pause, cwd=ROOT, log=log
        ).start()

    def waits(learner: ChildProcess, condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
        learner.wait_for(condition, what, timeout, poll=0.05)

    def kill(learner: ChildProcess) -> None:
        learner.stop(grace=10, first=signal.SIGKILL)

    def trained_ids() -> list[str]:
        return [i for v in store.versions() for i in store.read_manifest(v).event_ids]

    def announced() -> list[AdapterAnnouncement]:
        return [
            AdapterAnnouncement.from_bytes(r.value) for r in read_topic(kafka.bootstrap, ADAPTERS_TOPIC, None)
        ]

    # 1. killed after v1 is durable, before it is announced
    learner = start(pause_at="after_save")
    waits(learner, lambda: "test hook: paused at after_save" in learner.output(None), "pause after save")
    kill(learner)
    assert store.versions() == ["v1"] and announced() == []

    # 2. restarted: announces v1 first; killed after announcing v2, before committing its offsets
    learner = start(pause_at="after_announce")
    waits(
        learner, lambda: "test hook: paused at after_announce" in learner.output(None), "pause after announce"
    )
    kill(learner)
    assert "newest version v1 was not announced" in learner.output(None)
    assert store.versions() == ["v1", "v2"] and [a.version for a in announced()] == ["v1", "v2"]

    # 3. killed at a random moment (an update takes ~0.1 s here): soon after the partitions are assigned
    # (consuming or in the first update), then soon after a run's first new version (in a later update,
    # saving or announcing). Never waits for progress that cannot come once every event is trained.
    def all_trained() -> bool:
        return len(trained_ids()) >= len(events)

    learner = start()
    waits(learner, lambda: "assigned [" in learner.output(None) or all_trained(), "the partitions")
    time.sleep(rng.uniform(0.0, 0.2))
    kill(learner)
    before = len(store.versions())
    learner = start()
    waits(learner, lambda: len(store.versions()) > before or all_trained(), "a new version")
    time.sleep(rng.uniform(0.0, 0.2))
    kill(learner)

    # 4. the last run trains the rest, and stops cleanly on SIGTERM
    learner = start()
    waits(learner, all_trained, "every event trained", timeout=90)
    code = learner.stop(grace=30)
    if processes == 1:
        assert code == 0, learner.output(None)
    else:  # torchrun exits 1 on SIGTERM whatever its ranks do; rank 0 stopped as one process does
        assert "learner stopped at v" in learner.output(None), learner.output(None)

    versions = store.versions()
    assert versions_on_disk(store_path) == versions == [f"v{n}" for n in range(1, len(versions) + 1)]
    assert all(store.verify(v) == [] for v in versions)  # no version is half-written
    manifests = [store.read_manifest(v) for v in versions]
    assert [m.parent for m in manifests] == ["v0", *versions[:-1]]
    assert Counter(trained_ids()) == Counter(e.event_id for e in events)  # each event exactly once
    by_version = {a.version: a for a in announced()}
    assert set(by_version) == set(versions)  # every version announced (a repeat or two is allowed)
    assert all(by_version[m.version].sha256 == m.sha256 for m in manifests)
