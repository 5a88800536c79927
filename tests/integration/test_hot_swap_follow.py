"""Servers following thumbtune.adapters on a real broker: announced versions go live, under load, exactly.

A broker of each test's own (`kafka`): the session broker's thumbtune.adapters carries other tests'
announcements.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client import REGISTRY

from learner.announce import Announcer, announcement_for
from learner.config import LearnerSettings
from learner.trainer import Learner
from service.engine import registry as adapters_module
from tests.support import wait_for
from tests.support.adapters import VersionWriter, reference_logprobs
from tests.support.learner import make_prompts, sample_events
from thumbtune.cli.broker import EmbeddedBroker
from thumbtune.core.settings import Settings
from thumbtune.core.store import LocalAdapterStore

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("single_thread")]
TOKEN = "admin-s3cret"


@pytest.fixture(scope="module")
def writer(tiny_model_dir: Path) -> VersionWriter:
    return VersionWriter(tiny_model_dir)


def announce(bootstrap: str, store: LocalAdapterStore, version: str) -> None:
    announcer = Announcer(Settings(kafka_bootstrap_servers=bootstrap))
    try:
        announcer.announce(announcement_for(store, version))
    finally:
        announcer.close()


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def train_one_version(settings: Settings) -> str:
    """What `thumbtune learn` does per batch: one PPO update on rated answers, saved as the next version.

    A high learning rate so the tiny model's log-probs move measurably in one update.
    """
    learner_settings = LearnerSettings(
        batch_size=8,
        min_batch=8,
        epochs=4,
        minibatch_size=8,
        lr=1e-2,
        early_stop_kl=None,
        max_staleness=1000,
        metrics_port=0,
    )
    learner = Learner(settings, learner_settings)
    events = sample_events(
        learner.policy,
        learner.base,
        make_prompts(2, 4, seed=1),
        4,
        5,
        lambda r: 1.0 if r[0] % 2 else -1.0,
        torch.Generator().manual_seed(1),
    )
    version = learner.train(events)
    assert version is not None
    return version


def test_a_learner_version_announced_goes_live_and_serves_exactly_its_saved_weights(
    client_factory, kafka: EmbeddedBroker, tiny_model_dir: Path, tmp_path: Path
) -> None:
    store = LocalAdapterStore(tmp_path / "adapters")
    client = client_factory(
        adapter_store=str(store.root), kafka_bootstrap_servers=kafka.bootstrap, admin_token=TOKEN
    )
    rt = client.app.state.runtime
    assert rt.follower.assigned.wait(30), rt.follower.state()
    swaps, latencies = (
        sample("thumbtune_adapter_swaps_total", {"trigger": "announcement"}),
        sample("thumbtune_adapter_swap_latency_seconds_count"),
    )
    request = {
        "model": "thumbtune",
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": True,
    }
    assert client.post("/v1/chat/completions", json=request).json()["adapter_version"] == "v0"

    assert train_one_version(rt.settings) == "v1"
    announce(kafka.bootstrap, store, "v1")
    wait_for(lambda: rt.adapters.live == "v1", what="v1 live")

    response = client.post("/v1/chat/completions", json=request)
    body = response.json()
    assert response.headers["x-thumbtune-adapter-version"] == body["adapter_version"] == "v1"
    served = [t["logprob"] for t in body["choices"][0]["logprobs"]["content"]]
    record = rt.store.get(body["id"])
    assert record.adapter_version == "v1" and len(record.response_token_ids) == len(served) > 0
    # the proof: the server's log-probs are what PeftModel.from_pretrained(base, v1/) computes from the
    # directory the learner saved
    expected = reference_logprobs(
        tiny_model_dir, store.path("v1"), record.prompt_token_ids, record.response_token_ids
    )
    assert max(abs(a - b) for a, b in zip(served, expected, strict=True)) < 1e-4
    base = reference_logprobs(tiny_model_dir, None, record.prompt_token_ids, record.response_token_ids)
    assert max(abs(a - b) for a, b in zip(served, base, strict=True)) > 1e-2  # and v1 is not the base
    assert sample("thumbtune_adapter_swaps_total", {"trigger": "announcement"}) == swaps + 1
    assert sample("thumbtune_adapter_swap_latency_seconds_count") == latencies + 1

    # a repeat announcement is a no-op
    announce(kafka.bootstrap, store, "v1")
    wait_for(lambda: rt.follower.announcements == 2, what="the repeat delivered")
    admin = client.get("/admin/adapters", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert admin["live"] == "v1" and admin["refused"] == {} and admin["follower"]["assigned"]
    assert sample("thumbtune_adapter_swaps_total", {"trigger": "announcement"}) == swaps + 1


@dataclass
class Stream:
    started: float
    status: int = 0
    version: str = ""
    fingerprints: set[str] = field(default_factory=set)
    response_id: str = ""
    token_times: list[float] = field(default_factory=list)
    ended: float = 0.0
    done: bool = False
    error: str | None = None


def stream_once(url: str) -> Stream:
    s = Stream(started=time.monotonic())
    request = {
        "model": "thumbtune",
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 48,
        "temperature": 1.0,
        "stream": True,
    }
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=request, timeout=30) as response:
            s.status = response.status_code
            s.version = response.headers.get("x-thumbtune-adapter-version", "")
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    s.done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    s.error = chunk["error"]["message"]
                    break
                s.fingerprints.add(chunk["system_fingerprint"])
                s.response_id = chunk["id"]
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content") is not None:
                    s.token_times.append(time.monotonic())
    except httpx.HTTPError as exc:
        s.error = repr(exc)
    s.ended = time.monotonic()
    return s


def test_swaps_under_concurrent_streaming_load_fail_nothing_and_keep_each_request_on_its_version(
    live_server_factory,
    kafka: EmbeddedBroker,
    writer: VersionWriter,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(adapters_module, "RESOLVE_GRACE_S", 0.2)
    store = LocalAdapterStore(tmp_path / "adapters")
    server = live_server_factory(
        adapter_store=str(store.root), kafka_bootstrap_servers=kafka.bootstrap, max_batch_size=8
    )
    rt = server.runtime
    assert rt.follower.assigned.wait(30), rt.follower.state()
    live_at: dict[str, float] = {}
    set_live = rt.adapters.set_live

    def timed_set_live(version: str) -> str:
        previous = set_live(version)
        live_at[version] = time.monotonic()
        return previous

    monkeypatch.setattr(rt.adapters, "set_live", timed_set_live)
    stop = threading.Event()
    streams: list[Stream] = []

    def client() -> None:
        while not stop.is_set():
            streams.append(stream_once(server.url))

    clients = [threading.Thread(target=client) for _ in range(6)]
    for t in clients:
        t.start()

    def served_by(version: str) -> int:
        return sum(s.version == version for s in list(streams))

    try:
        wait_for(lambda: served_by("v0") >= 3, timeout=60, what="answers from v0")
        for seed, version in ((1, "v1"), (2, "v2")):
            writer.write(store, 0.05, seed=seed)
            announce(kafka.bootstrap, store, version)
            wait_for(lambda v=version: served_by(v) >= 3, timeout=60, what=f"answers from {version}")
    finally:
        stop.set()
        for t in clients:
            t.join(60)

    for s in streams:
        assert (s.status, s.error, s.done) == (200, None, True), s
        assert s.fingerprints == {f"thumbtune-{s.version}"}, s  # every chunk from the version it started on
        assert rt.store.get(s.response_id).adapter_version == s.version  # and its event will say so
        gaps = [b - a for a, b in zip([s.started, *s.token_times], s.token_times, strict=False)]
        assert max(gaps) < 1.0, f"a {max(gaps):.2f} s stall in {s}"
    assert {s.version for s in streams} == {"v0", "v1", "v2"}
    # requests that started before a swap finished after it, on the version they started with
    for old, new in (("v0", "v1"), ("v1", "v2")):
        assert any(s.version == old and s.ended > live_at[new] for s in streams), (old, new)
    # and the retired versions were unloaded once nothing used them
    wait_for(lambda: set(rt.adapters.present()) == {"v0", "v2"}, what="v1 unloaded")
