"""The capability gate refuses a version that loses checkable answers live gets right, and admits one that
keeps them (the KL bounds are opened wide here, so only the gate can refuse). The gate applies to automatic
steps (announcements), as KL(new || live) does; an operator's pin overrides both."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from learner.announce import announcement_for
from tests.support.adapters import VersionWriter
from thumbtune.core.capability import CapabilityItem
from thumbtune.core.store import LocalAdapterStore

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("single_thread")]
TOKEN = "admin-s3cret"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def test_a_version_that_loses_what_live_answers_right_is_refused(
    client_factory, tiny_model_dir: Path, tmp_path: Path
) -> None:
    store = LocalAdapterStore(tmp_path / "adapters")
    client = client_factory(
        adapter_store=str(store.root),
        admin_token=TOKEN,
        adapter_follow=False,
        adapter_max_kl_base=100.0,
        adapter_max_kl_live=100.0,
        adapter_capability_prompts=6,
        adapter_capability_max_tokens=6,
        adapter_capability_max_losses=1,
    )
    gate = client.app.state.runtime.adapter_manager.admission.gate
    assert gate is not None and len(gate.items) == 6
    # the tiny random model knows no arithmetic: make each item's right answer what v0 answers to it
    answers = gate._answers("v0")
    assert all(answers), answers
    gate.items = [
        CapabilityItem(i.id, i.prompt, (text,)) for i, text in zip(gate.items, answers, strict=True)
    ]
    gate._right.clear()
    assert gate.right("v0") == [True] * 6

    writer = VersionWriter(tiny_model_dir)
    writer.write(store, 2.0, seed=1)  # v1: far from the base, answers differently
    writer.write(store, 0.0, seed=2)  # v2: LoRA B = 0, the base itself
    manager = client.app.state.runtime.adapter_manager
    manager.on_announcement(announcement_for(store, "v1"), time.monotonic())  # an automatic step: gated
    refusal = client.get("/admin/adapters", headers=ADMIN).json()["refused"]["v1"]
    assert refusal["reason"] == "capability", refusal
    assert "THUMBTUNE_ADAPTER_CAPABILITY_MAX_LOSSES = 1" in refusal["message"]
    assert "of 6 checkable prompts right, live v0 6" in refusal["message"]

    manager.on_announcement(announcement_for(store, "v2"), time.monotonic())
    body = client.get("/admin/adapters", headers=ADMIN).json()
    assert body["live"] == "v2"
    row = next(r for r in body["versions"] if r["version"] == "v2")
    assert row["capability"] == 6 and row["state"] == "good"
