"""`thumbtune bench exact-reward`: the rule's thumbs as rewards, the summary, a run on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.exact_reward import exact_rewards, run, summarise
from learner.config import LearnerSettings
from thumbtune.core.settings import Settings


def even_length(prompt: str, response: str) -> bool:
    return len(response) % 2 == 0


def test_exact_rewards_are_the_rules_thumbs() -> None:
    s = exact_rewards(even_length, ["a", "b", "c"], ["xy", "x", ""])
    assert s.tolist() == [1.0, -1.0, 1.0]


def _row(update: int, approval: float, capability: int, learner_s: float = 0.0) -> dict:
    return {"update": update, "approval": approval, "capability": capability, "learner_s": learner_s}


def test_summary_finds_the_first_update_at_80_percent_and_what_follows() -> None:
    rows = [_row(0, 0.2, 19), _row(5, 0.79, 18, 100.0), _row(10, 0.81, 17, 210.5), _row(15, 0.72, 19)]
    summary = summarise(rows, own_per_update=32)
    assert summary["updates_to_target"] == 10
    assert summary["own_answers_to_target"] == 320
    assert summary["learner_s_to_target"] == 210.5
    assert summary["min_approval_after_target"] == 0.72
    assert summary["capability_min"] == 17 and summary["capability_base"] == 19
    never = summarise(rows[:2], own_per_update=32)
    assert never["updates_to_target"] is None and never["min_approval_after_target"] is None


@pytest.mark.usefixtures("single_thread")
def test_a_short_run_on_the_tiny_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(model=str(tiny_model_dir), cache_dir=tmp_path / "cache")
    learner = LearnerSettings(
        rollout_prompts=2, rollout_samples=2, rollout_max_tokens=6, device="cpu", precision="float32"
    )
    results = run(
        settings,
        rule="tests.unit.test_bench_exact_reward:even_length",
        updates=3,
        every=2,
        learner=learner,
        heldout=["What is a cat?", "Name a colour."],
        out=tmp_path / "exact.json",
    )
    assert json.loads((tmp_path / "exact.json").read_text())["rows"] == results["rows"]
    rows = results["rows"]
    assert [r["update"] for r in rows] == [0, 2, 3]  # every 2nd, and the last
    assert [r["own_answers"] for r in rows] == [0, 8, 12]
    assert rows[0]["kl_to_base"] == 0  # v0 is the base
    assert rows[-1]["kl_to_base"] > 0  # the published average moved
    assert 0 < rows[1]["learner_s"] < rows[2]["learner_s"]
    assert results["config"]["learner"]["rollout_samples"] == 2
    with pytest.raises(ValueError, match="--updates"):
        run(settings, updates=0, learner=learner)
