"""`thumbtune bench ablate`: arms are validated before anything starts, and one arm runs end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.ablate import parse_arm, report, run_arm
from thumbtune.core.settings import Settings


def test_arm_specs_name_learner_settings_with_or_without_the_prefix() -> None:
    assert parse_arm("lam=1.0, THUMBTUNE_LEARNER_KL_COEF=0.3") == {"lam": "1.0", "kl_coef": "0.3"}
    assert parse_arm("") == {}


@pytest.mark.parametrize(
    ("spec", "message"),
    [("lamda=1", "not NAME=VALUE"), ("lam", "not NAME=VALUE"), ("lam=2.0", "less than or equal to 1")],
)
def test_bad_arm_specs_are_refused_with_the_reason(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_arm(spec)


def even_length(prompt: str, response: str) -> bool:
    """A rule that splits the tiny model's gibberish answers about in half (``concise`` approves them all,
    and a batch of equal rewards carries no signal)."""
    return len(response) % 2 == 0


@pytest.mark.usefixtures("single_thread")
def test_one_arm_trains_versions_and_evaluates_the_last(tiny_model_dir: Path) -> None:
    result = run_arm(
        Settings(model=str(tiny_model_dir)),
        {
            "epochs": "1",
            "minibatch_size": "4",
            "lam": "1.0",
            "lr": "0.05",
            "kl_penalty": "k3",
            "average_decay": "0.5",
        },
        rule="tests.unit.test_bench_ablate:even_length",
        versions=2,
        batch_size=4,
        max_tokens=6,
        eval_every=100,
        samples_per_prompt=1,
        seed=3,
    )
    assert [row["version"] for row in result["versions"]] == [1, 2]
    assert result["config"]["lam"] == 1.0 and result["config"]["epochs"] == 1
    for row in result["versions"]:
        assert 0.0 <= row["approval"] <= 1.0 and row["update_s"] > 0
        assert row["average_gap"] > 0  # the arm samples with the average, which trails what PPO trains
    (evaluation,) = result["evaluations"]  # only the last: 2 is not a multiple of 100
    assert evaluation["version"] == 2 and evaluation["thumbs"] == 8
    assert evaluation["capability_of"] == 30 and evaluation["kl_to_base"] > 0  # v2 moved off the base
    lines = report({"arms": {"lam=1.0": result}})
    assert lines[0].startswith("arm lam=1.0: batch approval by thirds") and "v2" in lines[1]
