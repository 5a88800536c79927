"""`thumbtune bench reward-features`: the classification figures by hand, a run on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.reward_features import VARIANTS, classify, run
from learner.config import LearnerSettings
from thumbtune.core.settings import Settings


def test_classification_figures_by_hand() -> None:
    scores = torch.tensor([2.0, -1.0, 0.5, -3.0, -0.5])
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    figures = classify(scores, labels)
    # pairs (up, down): 2 > all three; -1 > -3 only: 4 of 6
    assert figures["auc"] == pytest.approx(4 / 6)
    assert figures["accuracy"] == pytest.approx(3 / 5)  # right: 2.0, -3.0, -0.5
    assert figures["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    expected = (
        -sum(
            math.log(1 / (1 + math.exp(-s))) if y else math.log(1 - 1 / (1 + math.exp(-s)))
            for s, y in zip(scores.tolist(), labels.tolist(), strict=True)
        )
        / 5
    )
    assert figures["log_loss"] == pytest.approx(expected, rel=1e-5)
    always_down = classify(torch.full((5,), -1.0), labels)
    assert always_down["accuracy"] == pytest.approx(3 / 5) and always_down["balanced_accuracy"] == 0.5
    assert always_down["auc"] == 0.5


def even_length(prompt: str, response: str) -> bool:
    return len(response) % 2 == 0


@pytest.mark.usefixtures("single_thread")
def test_a_short_run_on_the_tiny_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(model=str(tiny_model_dir), cache_dir=tmp_path / "cache")
    learner = LearnerSettings(rollout_samples=2, rollout_max_tokens=6, device="cpu", precision="float32")
    rule = "tests.unit.test_bench_reward_features:even_length"
    results = run(settings, rules_=[rule], answers=24, batch=8, learner=learner, out=tmp_path / "rf.json")
    assert json.loads((tmp_path / "rf.json").read_text())["rows"] == results["rows"]
    rows = results["rows"]
    assert [r["variant"] for r in rows] == list(VARIANTS)
    assert [r["dim"] for r in rows] == [128, 256, 128, 256]  # the tiny model's hidden size is 64
    assert all(0 <= r["auc"] <= 1 or math.isnan(r["auc"]) for r in rows)
    assert 0 <= results["approval"][rule] <= 1
    with pytest.raises(ValueError, match="multiple of 2"):
        run(settings, rules_=[rule], answers=25, batch=8, learner=learner)
