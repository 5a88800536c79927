"""Adapter versions on one server without Kafka: start-up, refusals with reasons, pin/unpin/rollback, routing.

Versions are written straight into a store (tests/support/adapters.py); announcements are handed to the
manager directly. test_hot_swap_follow.py covers the same path through the announcements topic.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import REGISTRY

from learner.announce import announcement_for
from service.adapters.follower import AdapterFollower
from service.engine import registry as adapters_module
from tests.support import wait_for
from tests.support.adapters import VersionWriter, corrupt
from thumbtune.core.store import LocalAdapterStore

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("single_thread")]
TOKEN = "admin-s3cret"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def writer(tiny_model_dir: Path) -> VersionWriter:
    return VersionWriter(tiny_model_dir)


@pytest.fixture
def store(tmp_path: Path) -> LocalAdapterStore:
    return LocalAdapterStore(tmp_path / "adapters")


def refused_total(reason: str) -> float:
    return REGISTRY.get_sample_value("thumbtune_adapter_refused_total", {"reason": reason}) or 0.0


def chat(client, model: str = "thumbtune", **extra: object):
    messages = [{"role": "user", "content": "Say hello."}]
    body = {"model": model, "messages": messages, "max_tokens": 4, "temperature": 0, **extra}
    return client.post("/v1/chat/completions", json=body)


def admin(client, action: str | None = None, **body: object) -> dict:
    if action is None:
        response = client.get("/admin/adapters", headers=ADMIN)
    else:
        response = client.post(f"/admin/adapters/{action}", headers=ADMIN, json=body or None)
    assert response.status_code == 200, response.text
    return response.json()


def test_start_up_serves_the_newest_good_version_and_refuses_bad_ones_with_reasons(
    client_factory, writer: VersionWriter, store: LocalAdapterStore
) -> None:
    def nan(tensors: dict[str, torch.Tensor]) -> None:
        name = max(tensors)
        tensors[name][0, 0] = float("nan")

    def rank4(tensors: dict[str, torch.Tensor]) -> None:
        name = next(n for n in sorted(tensors) if "lora_A" in n)
        tensors[name] = tensors[name][:4].contiguous()

    assert writer.write(store, 0.05, seed=1) == "v1"
    assert writer.write(store, 0.05, seed=2) == "v2"  # the newest good one
    writer.write(store, 0.05, seed=3, edit=nan)
    writer.write(store, 0.05, seed=4, edit=rank4)
    writer.write(store, 0.05, seed=5, base_fingerprint="0" * 32)
    corrupt(store, writer.write(store, 0.05, seed=6))
    writer.write(store, 2.0, seed=7)  # far from the base: over the tight KL(new || base) bound below
    before = {r: refused_total(r) for r in ("sha256", "fingerprint", "shape", "nonfinite", "kl_base")}

    client = client_factory(
        adapter_store=str(store.root), admin_token=TOKEN, adapter_follow=False, adapter_max_kl_base=0.015
    )
    body = admin(client)

    assert body["live"] == "v2" and body["pinned"] is None and body["loaded"] == ["v0", "v2"]
    assert {v: r["reason"] for v, r in body["refused"].items()} == {
        "v3": "nonfinite",
        "v4": "shape",
        "v5": "fingerprint",
        "v6": "sha256",
        "v7": "kl_base",
    }
    assert "adapter_model.safetensors: sha256 mismatch" in body["refused"]["v6"]["message"]
    assert "NaN" in body["refused"]["v3"]["message"]
    rows = {row["version"]: row for row in body["versions"]}
    assert rows["v1"]["state"] == "unchecked" and rows["v2"]["state"] == "good" and rows["v2"]["live"]
    assert 0 < rows["v2"]["kl_base"] < 0.015
    for reason, count in before.items():
        assert refused_total(reason) == count + 1, reason
    metrics = client.get("/metrics").text
    assert 'thumbtune_adapter_refused_total{reason="sha256"}' in metrics
    assert 'thumbtune_active_adapter_info{adapter_version="v2"} 1.0' in metrics

    live = chat(client)
    assert live.status_code == 200 and live.headers["x-thumbtune-adapter-version"] == "v2"
    assert live.json()["adapter_version"] == "v2"
    assert chat(client, "thumbtune@v2").json()["adapter_version"] == "v2"
    assert chat(client, "thumbtune@v0").json()["adapter_version"] == "v0"
    for not_loaded in ("thumbtune@v1", "thumbtune@v3"):
        response = chat(client, not_loaded)
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_pin_unpin_and_rollback_through_the_admin_api(
    client_factory, writer: VersionWriter, store: LocalAdapterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapters_module, "RESOLVE_GRACE_S", 0.2)
    for seed in (1, 2, 3):
        writer.write(store, 0.05, seed=seed)
    client = client_factory(
        adapter_store=str(store.root), admin_token=TOKEN, adapter_follow=False, adapter_max_kl_live=0.01
    )
    rt = client.app.state.runtime
    assert admin(client)["live"] == "v3"

    assert client.post("/admin/adapters/rollback").status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert client.post("/admin/adapters/rollback", headers=wrong).status_code == 401
    for expected in ("v2", "v1", "v0"):
        body = admin(client, "rollback")
        assert (body["live"], body["pinned"], body["following"]) == (expected, expected, False)
        assert chat(client).headers["x-thumbtune-adapter-version"] == expected
    response = client.post("/admin/adapters/rollback", headers=ADMIN)
    assert response.status_code == 409 and "no good version before v0" in response.json()["error"]["message"]

    body = admin(client, "pin", version="v3")
    assert (body["live"], body["pinned"]) == ("v3", "v3")

    # while pinned, a new version is announced: it waits; a bad one is refused when it is pinned
    writer.write(store, 0.05, seed=4)
    rt.adapter_manager.on_announcement(announcement_for(store, "v4"), time.monotonic())
    assert admin(client)["live"] == "v3"
    writer.write(store, 0.05, seed=5, edit=lambda t: t[min(t)].fill_(float("inf")))
    for _ in range(2):  # refused once, then known to be refused
        response = client.post("/admin/adapters/pin", headers=ADMIN, json={"version": "v5"})
        assert response.status_code == 409, response.text
        assert "nonfinite" in response.json()["error"]["message"]
    for missing in ("v9", "latest"):
        response = client.post("/admin/adapters/pin", headers=ADMIN, json={"version": missing})
        assert response.status_code == 404 and response.json()["error"]["param"] == "version"
    assert client.post("/admin/adapters/pin", headers=ADMIN, json={}).status_code == 400

    body = admin(client, "unpin")  # follow the newest good version again: v5 is refused, so v4
    # following is False only because adapter_follow is off in this test
    assert (body["live"], body["pinned"], body["following"]) == ("v4", None, False)
    assert body["refused"] == {"v5": body["refused"]["v5"]} and body["refused"]["v5"]["reason"] == "nonfinite"
    assert chat(client, "thumbtune@v4").json()["adapter_version"] == "v4"

    # following again: a version too far from the live one is refused (it would be 0.01 < KL ~ 0.025)
    writer.write(store, 1.0, seed=6)
    rt.adapter_manager.on_announcement(announcement_for(store, "v6"), time.monotonic())
    body = admin(client)
    assert body["live"] == "v4" and body["refused"]["v6"]["reason"] == "kl_live"
    assert "THUMBTUNE_ADAPTER_MAX_KL_LIVE" in body["refused"]["v6"]["message"]

    # versions nobody uses any more are unloaded; v0 and the live one stay
    wait_for(lambda: set(rt.adapters.present()) == {"v0", "v4"}, what="retired versions unloaded")
    assert chat(client, "thumbtune@v3").status_code == 404

    # approval so far, per version (the tally is per process: count what this test adds)
    def v4_row() -> dict:
        return next(r for r in admin(client)["versions"] if r["version"] == "v4")

    ratings, approvals = v4_row()["ratings"], v4_row()["approvals"]
    for thumb in ("up", "up", "down"):
        answer = chat(client).json()
        rating = {"response_id": answer["id"], "thumb": thumb}
        assert client.post("/v1/feedback", json=rating).status_code == 202
    row = v4_row()
    assert (row["ratings"] - ratings, row["approvals"] - approvals) == (3, 2)
    assert row["approval_rate"] == row["approvals"] / row["ratings"]


def test_a_backlog_of_announcements_loads_the_newest_good_version_only(
    client_factory, writer: VersionWriter, store: LocalAdapterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a broker outage one poll delivers several announcements: the newest that passes goes live with
    one load, older ones are skipped; a refused newest falls back to the next older (as one at a time)."""
    client = client_factory(adapter_store=str(store.root), admin_token=TOKEN, adapter_follow=False)
    rt = client.app.state.runtime
    follower = AdapterFollower(rt.settings, rt.adapter_manager)
    loaded: list[str] = []
    load = rt.adapters.load
    monkeypatch.setattr(rt.adapters, "load", lambda v, *a: (loaded.append(v), load(v, *a))[1])

    def poll(*versions: str) -> dict:
        records = [
            SimpleNamespace(value=announcement_for(store, v).to_bytes(), partition=0, offset=i)
            for i, v in enumerate(versions)
        ]
        return {"thumbtune.adapters": records}

    for seed in (1, 2, 3):
        writer.write(store, 0.05, seed=seed)
    follower.on_records(poll("v1", "v2", "v3"))
    assert (rt.adapters.live, loaded) == ("v3", ["v3"])
    writer.write(store, 0.05, seed=4)
    writer.write(store, 0.05, seed=5, edit=lambda t: t[min(t)].fill_(float("nan")))  # refused
    follower.on_records(poll("v4", "v5"))
    assert (rt.adapters.live, loaded) == ("v4", ["v3", "v4"])
    assert admin(client)["refused"]["v5"]["reason"] == "nonfinite"
