"""The Kafka learner (learner/consumer.py) in-process, on the tiny model and a broker of its own.

Each test starts its own embedded broker: the session broker's thumbtune.feedback also carries other
tests' events, and these tests count every record on the topic.
"""

from __future__ import annotations

import itertools
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from kafka import KafkaAdminClient

from learner.config import LearnerSettings
from learner.consumer import KafkaLearner
from learner.metrics import start_metrics_server
from tests.support.kafka import produce, read_topic
from tests.support.learner import make_events, records_of
from thumbtune.cli.broker import EmbeddedBroker
from thumbtune.cli.process import free_port
from thumbtune.core.contract import (
    ADAPTERS_TOPIC,
    CONTROL_TOPIC,
    LEARNER_GROUP,
    AdapterAnnouncement,
    ControlAck,
    ControlAction,
    ControlRecord,
)
from thumbtune.core.settings import Settings
from thumbtune.core.store import LocalAdapterStore

pytestmark = [
    pytest.mark.broker,
    pytest.mark.feedback_partitions(3),
    pytest.mark.usefixtures("single_thread"),
]


def learner_settings(**overrides: object) -> LearnerSettings:
    values: dict = {
        "batch_size": 8,
        "min_batch": 8,
        "max_wait_s": 60,
        "epochs": 1,
        "minibatch_size": 8,
        "max_staleness": 1000,
        "metrics_port": 0,
    }
    return LearnerSettings(**(values | overrides))


def until(condition: Callable[[], bool], timeout: float = 120) -> Callable[[], bool]:
    """A ``stop_when`` for KafkaLearner.run that fails the test instead of hanging."""
    deadline = time.monotonic() + timeout

    def check() -> bool:
        if condition():
            return True
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        return False

    return check


@pytest.fixture
def settings(tiny_model_dir: Path, tmp_path: Path, kafka: EmbeddedBroker) -> Settings:
    return Settings(
        model=str(tiny_model_dir),
        cache_dir=tmp_path / "cache",
        adapter_store=str(tmp_path / "adapters"),
        kafka_bootstrap_servers=kafka.bootstrap,
    )


def test_learner_trains_every_event_once_announces_each_version_and_serves_metrics(
    settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    events = make_events(tiny_model_dir, tmp_path, 24, seed=1)
    records = records_of(events)
    records.insert(5, records[1])  # a producer retry: same event id, a later offset
    records.insert(9, (b"garbage", b"{not json"))
    produce(settings.kafka_bootstrap_servers, records)
    port = free_port()
    server = start_metrics_server("127.0.0.1", port)
    assert server is not None
    try:
        loop = KafkaLearner(settings, learner_settings())
        versions = loop.run(stop_when=until(lambda: len(loop.versions) >= 3))
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()

    assert versions == ["v1", "v2", "v3"]
    store = LocalAdapterStore(settings.adapter_store_path)
    manifests = [store.read_manifest(v) for v in versions]
    assert [m.parent for m in manifests] == ["v0", "v1", "v2"]
    trained = [i for m in manifests for i in m.event_ids]
    assert sorted(trained) == sorted(e.event_id for e in events)  # every event, each exactly once
    assert all(store.verify(v) == [] for v in versions)
    for older, newer in itertools.pairwise(manifests):  # offsets are cumulative, never go back
        assert all(newer.offsets.get(k, -1) >= v for k, v in older.offsets.items())
    assert sum(manifests[-1].offsets.values()) <= len(records)
    assert loop.learner.skips.total == {"duplicate": 1, "not_json": 1}

    announced = [
        AdapterAnnouncement.from_bytes(r.value)
        for r in read_topic(settings.kafka_bootstrap_servers, ADAPTERS_TOPIC, expected=3)
    ]
    assert [a.version for a in announced] == versions
    for a, m in zip(announced, manifests, strict=True):
        assert (a.sha256, a.parent, a.event_count, a.base_fingerprint) == (
            m.sha256,
            m.parent,
            8,
            m.base_fingerprint,
        )
        assert "kl_ref" in a.stats

    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    try:  # commits follow the announcements: the group's offsets are the last version's
        committed = admin.list_group_offsets(LEARNER_GROUP)[LEARNER_GROUP]
    finally:
        admin.close()
    assert {f"{tp.topic}:{tp.partition}": o.offset for tp, o in committed.items()} == manifests[-1].offsets

    for name in (
        "events_consumed_total",
        'events_dropped_total{reason="duplicate"}',
        'events_dropped_total{reason="not_json"}',
        "consumer_lag",
        "buffered_events",
        "batch_size_bucket",
        "update_duration_seconds_bucket",
        "versions_total",
        "announcements_total",
        "policy_loss",
        "value_loss",
        "entropy_nats",
        "approx_kl",
        "kl_ref_nats",
        "beta",
        "clip_fraction",
        "explained_variance",
        "mean_reward",
        "is_effective_sample_size",
        "response_length_drift_tokens",
    ):
        assert f"thumbtune_learner_{name}" in body, name
    assert "thumbtune_learner_current_version 3.0" in body


def test_a_restarted_learner_resumes_at_the_manifest_offsets_not_the_committed_ones(
    settings: Settings, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = make_events(tiny_model_dir, tmp_path, 24, seed=2)
    produce(settings.kafka_bootstrap_servers, records_of(events[:16]))
    with monkeypatch.context() as m:  # as if it crashed before every commit
        m.setattr(KafkaLearner, "_commit", lambda self, offsets: None)
        first = KafkaLearner(settings, learner_settings())
        assert first.run(stop_when=until(lambda: len(first.versions) >= 2)) == ["v1", "v2"]

    produce(settings.kafka_bootstrap_servers, records_of(events[16:] + events[3:4]))  # + a late retry
    second = KafkaLearner(settings, learner_settings())
    assert second.run(stop_when=until(lambda: len(second.versions) >= 1)) == ["v3"]

    store = LocalAdapterStore(settings.adapter_store_path)
    assert sorted(store.read_manifest("v3").event_ids) == sorted(e.event_id for e in events[16:])
    # It sought past everything v1 and v2 covered: the only duplicate it read is the late retry.
    assert second.learner.skips.total == {"duplicate": 1}


def test_a_stop_during_an_update_abandons_it_and_commits_nothing(
    settings: Settings, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import learner.trainer

    produce(settings.kafka_bootstrap_servers, records_of(make_events(tiny_model_dir, tmp_path, 8, seed=4)))
    loop = KafkaLearner(settings, learner_settings())
    real_update = learner.trainer.ppo_update

    def update_interrupted_by_sigterm(*args: object, **kwargs: object) -> dict[str, float]:
        loop.request_stop("SIGTERM")  # what the signal handler does; it raises inside an update
        return real_update(*args, **kwargs)

    monkeypatch.setattr(learner.trainer, "ppo_update", update_interrupted_by_sigterm)
    assert loop.run(stop_when=until(lambda: False, timeout=60)) == []

    assert LocalAdapterStore(settings.adapter_store_path).versions() == []
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    try:
        assert admin.list_group_offsets(LEARNER_GROUP)[LEARNER_GROUP] == {}
    finally:
        admin.close()


def test_a_stop_after_the_version_is_saved_still_announces_it_and_commits_its_offsets(
    settings: Settings, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM between the save and the end of the update (under data parallelism: while the other ranks
    hear of the save): the version is durable, so it goes out now rather than on the next start."""
    import learner.trainer

    produce(settings.kafka_bootstrap_servers, records_of(make_events(tiny_model_dir, tmp_path, 8, seed=4)))
    loop = KafkaLearner(settings, learner_settings())
    real_save = learner.trainer.save_version

    def save_then_sigterm(*args: object, **kwargs: object) -> str:
        real_save(*args, **kwargs)
        loop.request_stop("SIGTERM")  # what the signal handler does; it raises inside an update
        raise AssertionError("request_stop did not raise inside the update")  # pragma: no cover

    monkeypatch.setattr(learner.trainer, "save_version", save_then_sigterm)
    assert loop.run(stop_when=until(lambda: False, timeout=60)) == ["v1"]
    assert loop.interrupted

    store = LocalAdapterStore(settings.adapter_store_path)
    assert store.versions() == ["v1"] and store.verify("v1") == []
    announced = read_topic(settings.kafka_bootstrap_servers, ADAPTERS_TOPIC, expected=1)
    assert [AdapterAnnouncement.from_bytes(r.value).version for r in announced] == ["v1"]
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    try:
        committed = admin.list_group_offsets(LEARNER_GROUP)[LEARNER_GROUP]
    finally:
        admin.close()
    manifest = store.read_manifest("v1")
    assert {f"{tp.topic}:{tp.partition}": o.offset for tp, o in committed.items()} == manifest.offsets


def test_between_human_batches_the_learner_refines_on_its_own_answers_and_accounts_for_every_rating(
    settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """refine_rounds = 2: after each human batch, once the reward model is trusted, two versions trained
    on the learner's own answers alone; they cover their parent's offsets, so a restart loses nothing."""
    events = make_events(tiny_model_dir, tmp_path, 32, seed=3)
    ls = learner_settings(
        signal="reward_model",
        reward_model_window=8,
        reward_model_min_accuracy=0.0,  # any accuracy will do: this test is about what runs when
        rollout_prompts=2,
        rollout_samples=2,
        rollout_max_tokens=5,
        refine_rounds=2,
    )
    bootstrap = settings.kafka_bootstrap_servers
    produce(bootstrap, records_of(events[:16]))
    loop = KafkaLearner(settings, ls)
    # v1 (the reward model not yet trusted: no rounds after it), v2 (trusted), then two rounds
    loop.run(stop_when=until(lambda: len(loop.versions) >= 4))
    produce(bootstrap, records_of(events[16:24]))
    loop = KafkaLearner(settings, ls)  # a restart from a refined version's manifest
    loop.run(stop_when=until(lambda: len(loop.versions) >= 3))
    produce(bootstrap, records_of(events[24:]))
    loop = KafkaLearner(settings, ls)
    loop.run(stop_when=until(lambda: len(loop.versions) >= 2))

    store = LocalAdapterStore(settings.adapter_store_path)
    manifests = [store.read_manifest(v) for v in store.versions()]
    assert [m.event_count for m in manifests] == [8, 8, 0, 0, 8, 0, 0, 8, 0]
    assert [m.diagnostics.get("signal.refine", 0) for m in manifests] == [0, 0, 1, 1, 0, 1, 1, 0, 1]
    for parent, m in itertools.pairwise(manifests):
        assert m.parent == parent.version
        if m.event_count == 0:  # a round: own answers alone, the parent's offsets
            assert m.offsets == parent.offsets and m.diagnostics["signal.human_answers"] == 0
            assert m.diagnostics["signal.own_answers"] == 4
    trained = [i for m in manifests for i in m.event_ids]
    assert sorted(trained) == sorted(e.event_id for e in events)  # every rating, exactly once
    announced = read_topic(bootstrap, ADAPTERS_TOPIC, expected=len(manifests))
    assert [AdapterAnnouncement.from_bytes(r.value).version for r in announced] == store.versions()


def control_records(version: str, actor: str, reason: str, **fields: str) -> list[tuple[bytes, bytes]]:
    """A server's refusal of ``version`` on thumbtune.control, between a receipt and a malformed record."""
    refusal = ControlRecord(
        record_id=f"refuse-{version}",
        action=ControlAction.refuse,
        version=version,
        reason=reason,
        actor=actor,
        replica="server-1",
        issued_at=time.time(),
        **fields,
    )
    ack = ControlAck(record_id=None, replica="server-1", applied=True, live=version, at=time.time())
    return [
        (b"server-1", ack.model_dump_json().encode()),
        (b"garbage", b"{not json"),
        (refusal.record_id.encode(), refusal.model_dump_json().encode()),
    ]


def test_a_refused_head_is_left_for_the_version_before_it_live_and_after_a_restart(
    settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The cluster refuses the learner's newest version v2 while it runs: the next version trains on from
    v1. Then, while the learner is down, it refuses that one too (v3): the restarted learner replays the log
    and goes back to v1 again. Every rating is trained exactly once throughout."""
    events = make_events(tiny_model_dir, tmp_path, 32, seed=5)
    bootstrap = settings.kafka_bootstrap_servers
    produce(bootstrap, records_of(events[:16]))
    loop = KafkaLearner(settings, learner_settings())
    steps: list[str] = []

    def refuse_v2_then_rate() -> bool:
        if len(loop.versions) == 2 and not steps:
            produce(
                bootstrap, control_records("v2", "canary", "approval 0.31 below live's 0.52"), CONTROL_TOPIC
            )
            steps.append("refused")
        elif steps == ["refused"] and "v2" in loop.learner.refusals:  # heard it: more ratings arrive
            produce(bootstrap, records_of(events[16:24]))
            steps.append("rated")
        return len(loop.versions) >= 3

    assert loop.run(stop_when=until(refuse_v2_then_rate, timeout=60)) == ["v1", "v2", "v3"]

    reason = "KL to live 0.9 > 0.5"
    produce(bootstrap, control_records("v3", "checks", reason, check="kl_live"), CONTROL_TOPIC)
    produce(bootstrap, records_of(events[24:]))
    again = KafkaLearner(settings, learner_settings())
    assert again.run(stop_when=until(lambda: len(again.versions) >= 1, timeout=60)) == ["v4"]

    store = LocalAdapterStore(settings.adapter_store_path)
    manifests = [store.read_manifest(v) for v in store.versions()]
    assert [m.parent for m in manifests] == ["v0", "v1", "v1", "v1"]
    assert [m.event_count for m in manifests] == [8, 8, 8, 8]
    trained = [i for m in manifests for i in m.event_ids]
    assert sorted(trained) == sorted(e.event_id for e in events)  # every rating, exactly once
    for older, newer in itertools.pairwise(manifests):  # offsets go on from the refused head's
        assert all(newer.offsets[k] >= v for k, v in older.offsets.items())
        assert newer.offsets != older.offsets
    v3, v4 = manifests[2].model_extra, manifests[3].model_extra
    assert v3["restored_from"] == {
        "version": "v2",
        "actor": "canary",
        "reason": "approval 0.31 below live's 0.52",
    }
    assert v4["restored_from"] == {"version": "v3", "actor": "checks", "reason": f"kl_live: {reason}"}
    assert v4["refused"] == {
        "v2": "canary: approval 0.31 below live's 0.52",
        "v3": f"checks: kl_live: {reason}",
    }
