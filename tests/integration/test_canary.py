"""The canary stage on a real broker: a new version serves a sticky share of users, users' ratings decide
it (rolled back when they like it less, promoted when they do not), and a restarted replica comes up in
the state the log decided.

A broker of the test's own (`kafka`): the tallies are folded from the whole feedback topic.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from learner.announce import Announcer, announcement_for
from learner.control import Serving
from service.canary.assignment import serves_canary
from tests.support import wait_for
from tests.support.adapters import VersionWriter
from tests.support.kafka import read_topic
from thumbtune.cli.broker import EmbeddedBroker
from thumbtune.core.contract import CONTROL_TOPIC, ControlAck, ControlRecord, parse_control
from thumbtune.core.settings import Settings
from thumbtune.core.store import LocalAdapterStore

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("single_thread")]
TOKEN = "admin-s3cret"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
SHARE = 0.5
USERS = [f"user-{i}" for i in range(24)]


@pytest.fixture
def writer(tiny_model_dir: Path) -> VersionWriter:
    return VersionWriter(tiny_model_dir)


@pytest.fixture
def store(tmp_path: Path, writer: VersionWriter) -> LocalAdapterStore:
    store = LocalAdapterStore(tmp_path / "adapters")
    writer.write(store, 0.05, seed=1)
    return store


@pytest.fixture
def server(kafka: EmbeddedBroker, client_factory, store: LocalAdapterStore):  # noqa: ANN001, ANN201
    def start():  # noqa: ANN202
        client = client_factory(
            adapter_store=str(store.root),
            admin_token=TOKEN,
            kafka_bootstrap_servers=kafka.bootstrap,
            replica_id="r",
            canary_share=SHARE,
            canary_compare_share=1.0,
            adapter_max_kl_live=10.0,
        )
        runtime = client.app.state.runtime
        wait_for(lambda: runtime.control.connected.is_set(), what="the control log followed")
        wait_for(lambda: runtime.ratings_follower.caught_up.is_set(), what="the feedback topic read")
        return client

    return start


def announce(kafka: EmbeddedBroker, store: LocalAdapterStore, version: str) -> None:
    announcer = Announcer(Settings(kafka_bootstrap_servers=kafka.bootstrap))
    try:
        announcer.announce(announcement_for(store, version))
    finally:
        announcer.close()


def chat(client, user: str | None, model: str = "thumbtune") -> dict:  # noqa: ANN001
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "temperature": 0,
    }
    if user is not None:
        body["user"] = user
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def adapters(client) -> dict:  # noqa: ANN001
    return client.get("/admin/adapters", headers=ADMIN).json()


def rate_until(client, decided, canary_up: bool, limit: int = 400) -> int:  # noqa: ANN001
    """Users rate their answers (canary users thumbs ``canary_up``, the others the opposite) until
    ``decided()``; returns the ratings sent until then. They rate on while the judge (once a second) and the
    control log catch up: a decision seen a few ratings late costs nothing, a pause to wait for one that
    has not come yet cost 1.5 s every 8 ratings."""
    canary = adapters(client)["canary"]["version"]
    for n in range(1, limit + 1):
        if decided():
            return n - 1
        answer = chat(client, USERS[n % len(USERS)])
        up = canary_up if answer["adapter_version"] == canary else not canary_up
        rating = {"response_id": answer["id"], "thumb": "up" if up else "down"}
        assert client.post("/v1/feedback", json=rating).status_code == 202
    raise AssertionError(f"no decision after {limit} ratings: {adapters(client)['canary']}")


def test_a_canary_serves_a_sticky_share_and_users_ratings_roll_it_back_or_promote_it(
    server, kafka: EmbeddedBroker, store: LocalAdapterStore, writer: VersionWriter
) -> None:  # noqa: ANN001
    client = server()
    assert adapters(client)["live"] == "v1" and adapters(client)["canary"] is None  # a new cluster: newest

    writer.write(store, 0.05, seed=2)
    announce(kafka, store, "v2")
    wait_for(lambda: adapters(client)["canary"] is not None, what="v2 the canary")
    body = adapters(client)
    assert body["live"] == "v1" and body["canary"]["version"] == "v2" and body["canary"]["share"] == SHARE
    stages = {row["version"]: row["stage"] for row in body["versions"]}
    assert stages == {"v0": "checked", "v1": "live", "v2": "canary"}

    # sticky per user, the share as the hash says; no user, a version named, or base: not the canary
    for user in USERS:
        served = {chat(client, user)["adapter_version"] for _ in range(2)}
        assert served == {"v2" if serves_canary("v2", user, SHARE) else "v1"}, user
    assert 0 < sum(serves_canary("v2", u, SHARE) for u in USERS) < len(USERS)
    assert chat(client, None)["adapter_version"] == "v1"
    canary_user = next(u for u in USERS if serves_canary("v2", u, SHARE))
    assert chat(client, canary_user, "thumbtune@v1")["adapter_version"] == "v1"
    assert chat(client, canary_user, "base")["adapter_version"] == "base"

    # compare mode mixes the two (not saying which answer is which): a choice is a head-to-head
    for i in range(3):
        body = {
            "model": "thumbtune",
            "messages": [{"role": "user", "content": f"Hi {i}"}],
            "max_tokens": 2,
            "n": 2,
        }
        response = client.post("/v1/chat/completions", json=body)
        assert response.headers["x-thumbtune-adapter-version"] == "v1+v2"
        first, second = response.headers["x-thumbtune-response-ids"].split(",")
        assert client.post("/v1/feedback", json={"chosen": first, "rejected": second}).status_code == 202
    wait_for(
        lambda: (lambda c: c["wins"] + c["losses"])(adapters(client)["canary"]) == 3, what="3 head-to-heads"
    )

    # users like v2 less: the judge rolls it back (a refusal with the test's figures), v1 stays live
    started = time.monotonic()
    ratings = rate_until(client, lambda: "v2" in adapters(client)["refused"], canary_up=False)
    body = adapters(client)
    refusal = body["refused"]["v2"]
    assert refusal["reason"] == "canary", refusal
    assert "approval canary" in refusal["message"] and "< 0" in refusal["message"], refusal
    assert body["live"] == "v1" and body["canary"] is None
    print(f"rolled back after {ratings} ratings, {time.monotonic() - started:.1f} s")
    exported = client.get("/metrics").text
    refusals = re.search(
        r'thumbtune_control_decisions_total\{action="refuse",actor="canary",outcome="applied"\} (\S+)',
        exported,
    )
    assert refusals is not None and float(refusals.group(1)) >= 1
    assert 'thumbtune_canary_ratings{of="canary"}' in exported

    # users like v3 more: promoted
    writer.write(store, 0.05, seed=3)
    announce(kafka, store, "v3")
    wait_for(lambda: (adapters(client)["canary"] or {}).get("version") == "v3", what="v3 the canary")
    rate_until(client, lambda: adapters(client)["live"] == "v3", canary_up=True)
    body = adapters(client)
    assert body["canary"] is None
    stages = {row["version"]: row["stage"] for row in body["versions"]}
    assert stages == {"v0": "checked", "v1": "retired", "v2": "refused", "v3": "live"}

    def folded() -> dict | None:  # the tallies have stopped moving: every rating sent is in
        before = {row["version"]: row for row in adapters(client)["versions"]}
        time.sleep(1.0)
        after = {row["version"]: row for row in adapters(client)["versions"]}
        return (
            after
            if {v: r["ratings"] for v, r in before.items()} == {v: r["ratings"] for v, r in after.items()}
            else None
        )

    approval = wait_for(folded, what="the tallies caught up with the feedback topic")
    assert approval["v1"]["ratings"] > 0 and approval["v1"]["approval_interval"] is not None

    # the decisions are on the log, by the canary stage; a restarted replica comes up where they left it
    decisions = [
        r for r in map(parse_control, (m.value for m in read_topic(kafka.bootstrap, CONTROL_TOPIC, None)))
    ]
    steps = [(d.action.value, d.version, d.actor) for d in decisions if isinstance(d, ControlRecord)]
    assert steps == [
        ("canary", "v2", "canary"),
        ("refuse", "v2", "canary"),
        ("canary", "v3", "canary"),
        ("promote", "v3", "canary"),
    ]
    # the receipts say what the replica served after each step: what the learner keeps training on
    receipts = [(a.live, a.canary) for a in decisions if isinstance(a, ControlAck) and a.record_id]
    assert ("v1", "v2") in receipts and ("v1", "v3") in receipts and receipts[-1] == ("v3", None)
    serving = Serving()
    for record in decisions:
        serving.take(record)
    assert serving.versions() == {"v3"}
    client.__exit__(None, None, None)
    client = server()
    body = adapters(client)
    assert body["live"] == "v3" and body["canary"] is None and "v2" in body["refused"]
    # the tallies are every replica's, from the topic: the restarted one has them all
    wait_for(
        lambda: (
            {row["version"]: row["ratings"] for row in adapters(client)["versions"]}
            == {row["version"]: row["ratings"] for row in approval.values()}
        ),
        what="the restarted replica's tallies equal the ones before",
    )
