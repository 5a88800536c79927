"""`thumbtune bench poison` (benchmarks/poison.py): arms, the evaluation marks in honest ratings, and the
comparison with the clean run. The runs themselves are tests/integration/test_bench_poison.py's; here each
arm is a recorded result, so the joining is what is tested."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import poison
from thumbtune.core.settings import Settings


def test_arms_are_named_once_each_and_unknown_ones_refused() -> None:
    assert poison.parse_arms("clean, caps-on") == ["clean", "caps-on"]
    for bad in ("", "clean,clean", "clean,caps"):
        with pytest.raises(ValueError, match="--arms takes"):
            poison.parse_arms(bad)


def test_versions_are_evaluated_at_each_mark_of_honest_ratings_and_the_last() -> None:
    ends = [{"version": f"v{i}", "thumbs": t} for i, t in enumerate([15, 31, 47, 60, 78, 95, 110], 1)]
    chosen = poison.at_marks(32)(ends)
    # the last batch end at or below 32, 64 and 96, then the last
    assert [r["version"] for r in chosen] == ["v2", "v4", "v6", "v7"]
    assert poison.at_marks(32)([]) == []
    assert [r["version"] for r in poison.at_marks(500)(ends)] == ["v7"]


def result(arm: str, approvals: list[tuple[int, float]], share: float) -> dict:
    return {
        "config": {"arm": arm, "rule": "concise", "attacker_share": share},
        "summary": {"capability_min": 18, "capability_base": 19, "versions": 9, "loop_wall_s": 100.0},
        "versions": [{"version": f"v{i}", "thumbs": t, "approval": a} for i, (t, a) in enumerate(approvals)],
        "all_versions": [
            {
                "diagnostics": {
                    "raters.top_share": 0.5,
                    "raters.top_share_capped": 0.2 if arm == "caps-on" else 0.5,
                }
            }
        ],
    }


def test_each_attacked_arm_is_compared_with_the_clean_run_at_the_same_honest_ratings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded = {
        "clean": result("clean", [(0, 0.2), (160, 0.5), (320, 0.7)], 0.0),
        "caps-off": result("caps-off", [(0, 0.2), (160, 0.15), (318, 0.1)], 0.5),
        "caps-on": result("caps-on", [(0, 0.2), (160, 0.4), (320, 0.63)], 0.49),
    }
    calls = []

    def fake_run_arm(settings: Settings, arm: str, *, out: Path, **options: object) -> dict:
        calls.append((arm, out))
        return recorded[arm]

    monkeypatch.setattr(poison, "run_arm", fake_run_arm)
    joint = poison.run(
        Settings(), arms=list(poison.ARMS), out=tmp_path, rule="concise", attacker_rule="verbose", seed=1
    )
    assert calls == [(arm, tmp_path / arm) for arm in poison.ARMS]
    c = joint["compare"]
    assert c["clean"]["ratio_to_clean"] == 1.0
    assert c["caps-on"]["ratio_to_clean"] == pytest.approx(0.63 / 0.7, abs=1e-3)
    # caps-off ended at 318 honest ratings: clean's curve there is 0.5 + 0.2 * 158 / 160 = 0.6975
    assert c["caps-off"]["clean_at_same_ratings"] == pytest.approx(0.6975)
    assert c["caps-off"]["ratio_to_clean"] == pytest.approx(0.1 / 0.6975, abs=1e-3)
    assert c["caps-on"]["top_share_capped_median"] == 0.2 and c["caps-off"]["attacker_share"] == 0.5
    assert json.loads((tmp_path / "poison.json").read_text()) == joint
    assert (tmp_path / "poison.png").stat().st_size > 10_000


def test_the_clean_curve_is_read_between_its_evaluations() -> None:
    points = [(0, 0.2), (160, 0.5), (320, 0.7)]
    assert poison.interpolate(points, 80) == pytest.approx(0.35)
    assert poison.interpolate(points, 0) == 0.2 and poison.interpolate(points, 400) == 0.7
    assert poison.interpolate([], 10) is None


def test_a_bad_rule_fails_before_any_system_starts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown rule"):
        poison.run(Settings(), arms=["clean"], out=tmp_path, rule="concise", attacker_rule="loud")
