"""`thumbtune learn --from-file events.jsonl --once`: learner.replay.run_from_file on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learner.config import LearnerSettings
from learner.policy import Policy
from learner.replay import run_from_file
from tests.support.learner import make_prompts, sample_events, tiny_base
from thumbtune.core.settings import Settings
from thumbtune.core.store import LocalAdapterStore

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def settings(tiny_model_dir: Path, tmp_path: Path) -> Settings:
    return Settings(
        model=str(tiny_model_dir), cache_dir=tmp_path / "cache", adapter_store=str(tmp_path / "adapters")
    )


@pytest.fixture
def events_file(settings: Settings, tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """20 rated answers v0 gave; plus a repeat, garbage, another base's event, a bad token id."""
    base = tiny_base(tiny_model_dir, tmp_path)
    policy = Policy.fresh(base.model, settings, torch.device("cpu"))
    events = sample_events(
        policy,
        base,
        make_prompts(5, 4, seed=0),
        4,
        5,
        lambda r: 1.0 if r[0] % 2 else -1.0,
        torch.Generator().manual_seed(0),
    )
    lines = [e.model_dump_json() for e in events]
    lines.insert(3, lines[1])  # Kafka redelivery: same event id again
    lines.insert(5, "{not json")
    other_base = {"event_id": "other-base", "base_fingerprint": "0" * 32}
    lines.insert(6, events[2].model_copy(update=other_base).model_dump_json())
    bad_token = {"event_id": "bad-token", "response_token_ids": [1, 2, 3, 4, 10**7]}
    lines.insert(7, events[2].model_copy(update=bad_token).model_dump_json())
    lines.insert(8, "")
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, [e.event_id for e in events]


def test_replay_trains_every_valid_event_exactly_once_into_consecutive_versions(
    settings: Settings, events_file: tuple[Path, list[str]]
) -> None:
    path, event_ids = events_file
    learner_settings = LearnerSettings(batch_size=8, min_batch=4, epochs=1, minibatch_size=8)

    versions = run_from_file(settings, learner_settings, path, once=True)

    assert versions == ["v1", "v2", "v3"]  # 8 + 8 + a final 4 (>= min_batch)
    store = LocalAdapterStore(settings.adapter_store_path)
    manifests = [store.read_manifest(v) for v in versions]
    assert [m.parent for m in manifests] == ["v0", "v1", "v2"]
    assert [m.event_count for m in manifests] == [8, 8, 4]
    assert [i for m in manifests for i in m.event_ids] == event_ids  # file order, each exactly once
    assert all(m.offsets == {} and store.verify(m.version) == [] for m in manifests)
    skipped = {k: v for k, v in manifests[0].diagnostics.items() if k.startswith("skipped.")}
    assert skipped == {
        "skipped.duplicate": 1,
        "skipped.not_json": 1,
        "skipped.fingerprint": 1,
        "skipped.token_out_of_vocab": 1,
    }
    assert {"policy_loss", "kl_ref", "beta", "is_ess", "update_s"} <= set(manifests[2].diagnostics)

    assert run_from_file(settings, learner_settings, path, once=True) == []  # already trained: nothing new
    assert store.versions() == ["v1", "v2", "v3"]


def test_replay_drops_events_served_too_many_versions_ago(
    settings: Settings, events_file: tuple[Path, list[str]]
) -> None:
    path, event_ids = events_file
    learner_settings = LearnerSettings(batch_size=8, min_batch=4, epochs=1, minibatch_size=8, max_staleness=0)

    # v0 served every answer: once v1 exists they are all one version stale
    assert run_from_file(settings, learner_settings, path) == ["v1"]
    assert LocalAdapterStore(settings.adapter_store_path).read_manifest("v1").event_ids == event_ids[:8]
