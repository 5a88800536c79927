"""What the learner does with thumbtune.control (learner/control.py): the versions it folds in as refused,
and the tiny learner leaving a refused head for the newest version that was not, offsets untouched."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch

import learner.trainer
from learner.average import lora_parameters
from learner.control import SUMMARY_CHARS, ControlFollower, Refusals, Serving, parse
from learner.metrics import REGISTRY
from learner.trainer import Learner
from tests.support.learner import make_prompts, sample_events, tiny_learner
from thumbtune.cli.process import free_port
from thumbtune.core.contract import AdapterManifest, ControlAck, ControlAction, ControlRecord
from thumbtune.core.settings import Settings

pytestmark = pytest.mark.usefixtures("single_thread")


def decision(action: ControlAction, version: str | None, **fields: object) -> bytes:
    values: dict = {
        "actor": "admin",
        "replica": "r1",
        "issued_at": 1.0,
        "record_id": f"{action.value}-{version}",
    }
    return ControlRecord(action=action, version=version, **(values | fields)).model_dump_json().encode()


def test_refusals_and_rollbacks_are_folded_in_and_everything_else_is_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ack = ControlAck(record_id="x", replica="r2", applied=True, live="v3", at=1.0).model_dump_json().encode()
    log = [
        decision(ControlAction.refuse, "v2", actor="checks", check="kl_live", reason="KL 0.9 > 0.5"),
        ack,
        decision(ControlAction.pin, "v1"),
        decision(ControlAction.unpin, None),
        decision(ControlAction.canary, "v5", actor="canary"),
        decision(ControlAction.promote, "v5", actor="canary"),
        decision(ControlAction.rollback, "v3", previous="v4"),  # rolled back from v4 to v3
        decision(ControlAction.refuse, "v2", reason="an operator agrees"),  # already known: the first stays
        decision(ControlAction.refuse, "v6", actor="canary", reason="x" * 2000),
        decision(ControlAction.refuse, "v0", reason="the base is the floor"),
        b"{not json",
        b"\xff\xfe",
        None,
        b'{"type": "decision", "action": "refuse", "version": "seven"}',
        b'{"type": "gossip"}',
    ]
    refusals = Refusals()
    with caplog.at_level(logging.WARNING, logger="learner.control"):
        for offset, value in enumerate(log):
            refusals.fold(value, f"thumbtune.control@{offset}")

    summary = refusals.summary()
    assert list(summary) == ["v2", "v4", "v6"]
    assert summary["v2"] == "checks: kl_live: KL 0.9 > 0.5"
    assert summary["v4"] == "admin: rolled back to v3"
    assert summary["v6"].startswith("canary: xxx") and len(summary["v6"]) == SUMMARY_CHARS
    skipped = [r.getMessage() for r in caplog.records if "not a control record" in r.getMessage()]
    assert [m.split(":")[0] for m in skipped] == [f"skipping thumbtune.control@{i}" for i in range(10, 15)]
    assert refusals.fallback(["v1", "v2", "v3", "v4", "v5", "v6"]) == ["v5", "v3", "v1", "v0"]
    assert refusals.fallback(["v2"]) == ["v0"]

    manifest = AdapterManifest(
        version="v7",
        parent="v5",
        base_model="m",
        base_fingerprint="f",
        created_at=1.0,
        event_count=0,
        refused=summary,
    )
    again = Refusals.from_manifest(manifest)  # what a restarted learner knows before it reads the log
    assert again.summary() == summary and again.get("v2").actor == "checks"


def test_what_each_replica_serves_is_its_newest_receipt() -> None:
    serving = Serving()
    assert serving.versions() == frozenset()

    def ack(replica: str, live: str, canary: str | None = None, leaving: bool = False) -> ControlAck:
        return ControlAck(
            record_id=None, replica=replica, applied=True, live=live, canary=canary, leaving=leaving, at=1.0
        )

    for record in [
        ack("r1", "v0"),
        parse(decision(ControlAction.promote, "v5", actor="canary"), "here"),  # decisions say nothing of it
        ack("r2", "v3", canary="v6"),
        ack("r1", "v5"),
        None,  # a malformed record, as `parse` returns it
    ]:
        serving.take(record)
    assert serving.versions() == frozenset({"v3", "v5", "v6"})
    serving.take(ack("r2", "v3", leaving=True))
    assert serving.versions() == frozenset({"v5"})


def test_an_unreachable_control_log_never_holds_the_learner_up() -> None:
    follower = ControlFollower(Settings(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}"), Refusals())
    started = time.monotonic()
    assert follower.start(wait_s=0.3) is False  # no broker: it says so and the learner trains on
    follower.stop(timeout=3.0)
    assert time.monotonic() - started < 2 and not follower._thread.is_alive()


def rated(learner: Learner, seed: int) -> list:
    """16 answers the learner's policy gives now, rated by the parity of their first token."""
    return sample_events(
        learner.policy,
        learner.base,
        make_prompts(4, 4, seed=seed),
        4,
        5,
        lambda r: 1.0 if r[0] % 2 else -1.0,
        torch.Generator().manual_seed(seed),
    )


def snapshot(learner: Learner) -> dict[str, dict[str, torch.Tensor]]:
    """theta, the published average w and the value head, as they are now."""
    return {
        "theta": {k: p.detach().clone() for k, p in lora_parameters(learner.policy.model).items()},
        "average": {k: w.clone() for k, w in learner.state.average.shadow.items()},
        "value_head": {k: v.clone() for k, v in learner.policy.value_head.state_dict().items()},
    }


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def at_update(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """What the policy and its state are when each PPO update starts."""
    seen: list[dict] = []
    real = learner.trainer.ppo_update

    def recording(policy, batch, state, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        theta = {k: p.detach().clone() for k, p in lora_parameters(policy.model).items()}
        seen.append(
            {
                "version": policy.version,
                "theta": theta,
                "average": {k: w.clone() for k, w in state.average.shadow.items()},
                "value_head": {k: v.clone() for k, v in policy.value_head.state_dict().items()},
                "updates": state.updates,
            }
        )
        return real(policy, batch, state, *args, **kwargs)

    monkeypatch.setattr(learner.trainer, "ppo_update", recording)
    return seen


def restores(actor: str) -> float:
    return REGISTRY.get_sample_value("thumbtune_learner_restores_total", {"actor": actor}) or 0.0


def test_the_next_update_after_a_refusal_of_the_head_trains_on_from_the_newest_version_not_refused(
    tiny_model_dir: Path, tmp_path: Path, at_update: list[dict]
) -> None:
    learner = tiny_learner(tiny_model_dir, tmp_path, lr=1e-2)
    assert learner.state.average is not None  # Polyak averaging is on: w must come back too
    assert learner.train(rated(learner, 1), {"thumbtune.feedback:0": 16}) == "v1"
    v1 = snapshot(learner) | {"updates": learner.state.updates}
    assert learner.train(rated(learner, 2), {"thumbtune.feedback:0": 32}) == "v2"
    v2 = snapshot(learner)
    served_by_v2 = rated(learner, 3)  # answered by v2 before the cluster refused it
    before = restores("canary")

    learner.refusals.fold(
        decision(ControlAction.refuse, "v2", actor="canary", reason="approval 0.31 below live's 0.52"),
        "log@0",
    )
    assert learner.train(served_by_v2, {"thumbtune.feedback:0": 48}) == "v3"

    started = at_update[-1]
    assert started["version"] == "v1" and started["updates"] == v1["updates"]
    for part in ("theta", "average", "value_head"):
        assert same(started[part], v1[part]), part
        assert not same(started[part], v2[part]), part
    m3 = learner.store.read_manifest("v3")
    assert m3.parent == "v1"
    assert m3.offsets == {"thumbtune.feedback:0": 48}  # on from v2's 32: what v2 trained on stays trained
    assert m3.event_ids == [e.event_id for e in served_by_v2]  # not too new for v1: the store is at v2
    assert m3.model_extra["restored_from"] == {
        "version": "v2",
        "actor": "canary",
        "reason": "approval 0.31 below live's 0.52",
    }
    assert m3.model_extra["refused"] == {"v2": "canary: approval 0.31 below live's 0.52"}
    assert restores("canary") == before + 1

    assert learner.train(rated(learner, 4), {"thumbtune.feedback:0": 64}) == "v4"
    m4 = learner.store.read_manifest("v4")
    assert m4.parent == "v3" and "restored_from" not in m4.model_extra
    assert m4.model_extra["refused"] == m3.model_extra["refused"]  # every version says what it knows
    restarted = tiny_learner(tiny_model_dir, tmp_path, lr=1e-2)
    assert restarted.version == "v4" and "v2" in restarted.refusals


def test_with_every_version_refused_the_learner_starts_over_from_the_empty_adapter(
    tiny_model_dir: Path, tmp_path: Path, at_update: list[dict]
) -> None:
    learner = tiny_learner(tiny_model_dir, tmp_path, lr=1e-2)
    assert learner.train(rated(learner, 1), {"thumbtune.feedback:0": 16}) == "v1"
    learner.refusals.fold(decision(ControlAction.rollback, "v0", previous="v1"), "log@0")

    assert learner.refine({"thumbtune.feedback:0": 16}) is None  # direct: no round, but it left v1
    assert learner.version == "v0" and learner.state.updates == 0 and not learner.state.prompts
    assert learner.train(rated(learner, 2), {"thumbtune.feedback:0": 32}) == "v2"

    started = at_update[-1]
    assert started["version"] == "v0" and started["updates"] == 0
    assert all(not w.any() for k, w in started["theta"].items() if "lora_B" in k)  # the base's output
    assert all(not v.any() for v in started["value_head"].values())
    m2 = learner.store.read_manifest("v2")
    assert m2.parent == "v0" and m2.model_extra["restored_from"]["version"] == "v1"
    assert m2.model_extra["refused"] == {"v1": "admin: rolled back to v0"}
