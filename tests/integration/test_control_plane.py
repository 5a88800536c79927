"""Two server replicas on one broker obey one control log: a decision taken on either is served by both,
and a replica that restarts comes up in the cluster's state.

A broker of the test's own (`kafka`): the session broker's thumbtune.control holds other tests' decisions.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from learner.announce import Announcer, announcement_for
from tests.support import wait_for
from tests.support.adapters import VersionWriter
from tests.support.kafka import read_topic
from thumbtune.cli.broker import EmbeddedBroker
from thumbtune.core.contract import CONTROL_TOPIC, ControlRecord, parse_control
from thumbtune.core.settings import Settings
from thumbtune.core.store import LocalAdapterStore

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("single_thread")]
TOKEN = "admin-s3cret"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
CONVERGED_S = 2.0
"""The issue's bound: a decision taken on one replica is served by every replica within 2 s."""


@pytest.fixture
def store(tmp_path: Path, tiny_model_dir: Path) -> LocalAdapterStore:
    store = LocalAdapterStore(tmp_path / "adapters")
    writer = VersionWriter(tiny_model_dir)
    for seed in (1, 2, 3):
        writer.write(store, 0.05, seed=seed)
    return store


@pytest.fixture
def replica(kafka: EmbeddedBroker, client_factory, store: LocalAdapterStore):  # noqa: ANN001, ANN201
    """``replica(name)``: a server on the shared store following the test's broker, its control log
    replayed and joined (so the others know it)."""

    def start(name: str, **overrides: object):  # noqa: ANN202
        settings = dict(adapter_max_kl_live=10.0) | overrides
        client = client_factory(
            adapter_store=str(store.root),
            admin_token=TOKEN,
            kafka_bootstrap_servers=kafka.bootstrap,
            replica_id=name,
            **settings,
        )
        wait_for(lambda: client.app.state.runtime.control.connected.is_set(), what=f"{name} follows the log")
        return client

    return start


def serving(client) -> str:  # noqa: ANN001
    messages = [{"role": "user", "content": "Say hello."}]
    body = {"model": "thumbtune", "messages": messages, "max_tokens": 2, "temperature": 0}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.headers["x-thumbtune-adapter-version"]


def act(client, action: str, **body: object) -> dict:  # noqa: ANN001
    response = client.post(f"/admin/adapters/{action}", headers=ADMIN, json=body or None)
    assert response.status_code == 200, response.text
    return response.json()


def state(client) -> tuple[str, str | None]:  # noqa: ANN001
    body = client.get("/admin/adapters", headers=ADMIN).json()
    return body["live"], body["pinned"]


def both_serve(a, b, version: str, since: float) -> float:  # noqa: ANN001
    """Wait until both replicas answer chat with ``version``; the seconds since ``since``."""
    wait_for(
        lambda: serving(a) == version and serving(b) == version, timeout=10, what=f"both serve {version}"
    )
    return time.monotonic() - since


def test_a_decision_on_one_replica_is_served_by_both_and_survives_a_restart(replica, kafka) -> None:  # noqa: ANN001
    a, b = replica("a"), replica("b")
    wait_for(lambda: "b" in a.app.state.runtime.control.replicas, what="a knows b")
    assert serving(a) == serving(b) == "v3"

    started = time.monotonic()
    body = act(a, "pin", version="v1")
    assert (body["live"], body["pinned"]) == ("v1", "v1")
    decision = body["decision"]
    assert decision["action"] == "pin" and decision["replica"] == "a" and decision["previous"] == "v3"
    assert decision["confirmed"] == {"b": "v1"} and decision["unconfirmed"] == [] and decision["failed"] == {}
    assert both_serve(a, b, "v1", started) < CONVERGED_S
    assert state(b) == ("v1", "v1")

    # b restarts: it comes up pinned where the cluster is, before it serves anything
    b.__exit__(None, None, None)
    wait_for(lambda: "b" not in a.app.state.runtime.control.replicas, what="b said it left")
    b = replica("b")
    assert state(b) == ("v1", "v1") and serving(b) == "v1"

    # rollback taken on b: a goes to the same version, resolved on b
    act(b, "pin", version="v2")
    started = time.monotonic()
    body = act(b, "rollback")
    assert (body["live"], body["pinned"], body["decision"]["version"]) == ("v1", "v1", "v1")
    assert body["decision"]["confirmed"] == {"a": "v1"}
    assert both_serve(a, b, "v1", started) < CONVERGED_S

    started = time.monotonic()
    body = act(a, "unpin")
    assert (body["live"], body["pinned"], body["following"]) == ("v3", None, True)
    assert both_serve(a, b, "v3", started) < CONVERGED_S
    assert state(a) == state(b) == ("v3", None)

    # a refusal steps every replica down from the live version, and stays after restarts
    started = time.monotonic()
    body = act(b, "refuse", version="v3", reason="users complain it is rude")
    assert body["live"] == "v2" and body["refused"]["v3"] == {
        "reason": "operator",
        "message": "users complain it is rude",
    }
    assert both_serve(a, b, "v2", started) < CONVERGED_S
    for client in (a, b):
        refused = client.get("/admin/adapters", headers=ADMIN).json()["refused"]
        assert refused["v3"]["message"] == "users complain it is rude"
        response = client.post("/admin/adapters/pin", headers=ADMIN, json={"version": "v3"})
        assert (
            response.status_code == 409 and "users complain it is rude" in response.json()["error"]["message"]
        )
    a.__exit__(None, None, None)
    a = replica("a")
    assert state(a) == ("v2", None) and serving(a) == "v2"
    assert a.get("/admin/adapters", headers=ADMIN).json()["refused"]["v3"]["reason"] == "operator"

    # the log: every decision once, in order, each receipted by every replica that was up
    records = [parse_control(r.value) for r in read_topic(kafka.bootstrap, CONTROL_TOPIC, None)]
    decisions = [r for r in records if isinstance(r, ControlRecord)]
    assert [(d.action.value, d.version) for d in decisions] == [
        ("pin", "v1"),
        ("pin", "v2"),
        ("rollback", "v1"),
        ("unpin", None),
        ("refuse", "v3"),
    ]
    for d in decisions:
        receipts = {r.replica for r in records if getattr(r, "record_id", None) == d.record_id and r is not d}
        assert receipts == {"a", "b"}, (d.action, receipts)


def test_a_version_one_replicas_checks_refuse_is_refused_on_every_replica(
    replica, kafka, store: LocalAdapterStore, tiny_model_dir: Path
) -> None:  # noqa: ANN001
    strict, lenient = replica("strict", adapter_max_kl_base=0.015), replica("lenient")
    assert serving(strict) == serving(lenient) == "v3"
    VersionWriter(tiny_model_dir).write(store, 2.0, seed=4)  # far from the base: over the strict bound only
    announcer = Announcer(Settings(kafka_bootstrap_servers=kafka.bootstrap))
    try:
        announcer.announce(announcement_for(store, "v4"))
    finally:
        announcer.close()

    def refused_v4(client) -> dict | None:  # noqa: ANN001
        return client.get("/admin/adapters", headers=ADMIN).json()["refused"].get("v4")

    for client in (strict, lenient):
        refusal = wait_for(lambda c=client: refused_v4(c), timeout=20, what="v4 refused")
        assert refusal["reason"] == "kl_base" and "THUMBTUNE_ADAPTER_MAX_KL_BASE" in refusal["message"]
    wait_for(lambda: serving(lenient) == "v3", what="lenient back on v3")
    assert serving(strict) == "v3"
    refusals = [
        r
        for r in map(parse_control, (r.value for r in read_topic(kafka.bootstrap, CONTROL_TOPIC, None)))
        if isinstance(r, ControlRecord)
    ]
    assert [(r.action.value, r.version, r.actor, r.check, r.replica) for r in refusals] == [
        ("refuse", "v4", "checks", "kl_base", "strict")
    ]


def test_admin_actions_answer_503_and_decide_nothing_while_the_log_is_unreachable(replica, kafka) -> None:  # noqa: ANN001
    a = replica("a")
    control = a.app.state.runtime.control
    control.connected.clear()  # as the thread does when Kafka stops answering
    response = a.post("/admin/adapters/pin", headers=ADMIN, json={"version": "v1"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "control_unavailable"
    assert "nothing was decided" in response.json()["error"]["message"]
    assert state(a) == ("v3", None)
    decisions = [r for r in read_topic(kafka.bootstrap, CONTROL_TOPIC, None) if b'"decision"' in r.value]
    assert decisions == []
