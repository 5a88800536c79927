"""`thumbtune bench loop --signal a,b` and `--canary-share x,y`: the runs side by side
(benchmarks/loop_compare.py). The loop itself is tests/integration/test_loop.py's; here each run is a recorded
result, so the joining is what is tested."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import loop_compare
from thumbtune.core.settings import Settings


def result(signal: str, to_target: int | None, wall: float) -> dict:
    versions = [
        {"version": "v0", "thumbs": 0, "wall_s": 0.0, "approval": 0.2},
        {"version": "v4", "thumbs": 128, "wall_s": wall / 2, "approval": 0.5},
        {"version": "v8", "thumbs": 256, "wall_s": wall, "approval": 0.85 if to_target else 0.6},
    ]
    rm = {"reward_model.recent_accuracy": 0.8}
    return {
        "config": {"rule": "concise", "signal": signal},
        "summary": {"thumbs_to_target": to_target, "loop_wall_s": wall, "final_approval": 0.85},
        "versions": versions,
        "all_versions": [{"thumbs": 32 * i, "diagnostics": rm if i > 1 else {}} for i in range(1, 9)],
    }


def test_signals_are_named_once_each_and_unknown_ones_refused() -> None:
    assert loop_compare.parse_signals("direct, both") == ["direct", "both"]
    for bad in ("", "direct,direct", "direct,rm"):
        with pytest.raises(ValueError, match="--signal takes"):
            loop_compare.parse_signals(bad)


def test_an_arm_differs_from_the_others_in_one_setting() -> None:
    assert loop_compare.arms(None, None) == {"run": {}}
    assert loop_compare.arms("both", None) == {"both": {"signal": "both"}}
    assert loop_compare.arms("direct,both", "0.1") == {
        "direct": {"canary_share": 0.1, "signal": "direct"},
        "both": {"canary_share": 0.1, "signal": "both"},
    }
    assert loop_compare.arms("direct", "0, 0.1") == {
        "canary-0": {"signal": "direct", "canary_share": 0.0},
        "canary-0.1": {"signal": "direct", "canary_share": 0.1},
    }
    for bad in ("", "0.1,0.1", "0.6", "-0.1", "ten"):
        with pytest.raises(ValueError, match="--canary-share takes"):
            loop_compare.arms(None, bad)
    with pytest.raises(ValueError, match="varies one setting"):
        loop_compare.arms("direct,both", "0,0.1")


def test_served_approval_is_counted_per_quarter_of_the_ratings() -> None:
    from benchmarks.loop import served_by_quarter
    from thumbtune.cli.simulate import Rating, Report

    report = Report()
    verdicts = [[False], [False], [True, False], [True], [True], [True, True], [False], [True]]
    report.ratings = [Rating(i, i, "v0", "p", ["a"], v, {}, False, [], [1]) for i, v in enumerate(verdicts)]
    assert served_by_quarter(report) == [0.0, 0.667, 1.0, 0.5]
    assert served_by_quarter(Report()) == [None, None, None, None]


def test_each_signal_runs_on_the_same_options_and_is_compared_with_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded = {"direct": result("direct", 768, 1000.0), "both": result("both", 256, 1500.0)}
    calls = []

    def fake_run(settings: Settings, *, out: Path, signal: str, **options: object) -> dict:
        calls.append((signal, out, options))
        return recorded[signal]

    monkeypatch.setattr(loop_compare, "run", fake_run)
    runs = loop_compare.arms("direct,both", None)
    joint = loop_compare.side_by_side(Settings(), runs, out=tmp_path, rule="concise", seed=3)
    assert [(s, o) for s, o, _ in calls] == [("direct", tmp_path / "direct"), ("both", tmp_path / "both")]
    assert all(options == {"rule": "concise", "seed": 3} for _, _, options in calls)
    assert joint["ratios"] == {
        "direct": {"ratings_ratio": 1.0, "wall_ratio": 1.0},
        "both": {"ratings_ratio": 3.0, "wall_ratio": 1.5},  # 768 / 256 ratings, 1500 / 1000 s
    }
    assert json.loads((tmp_path / "side-by-side.json").read_text()) == joint
    assert (tmp_path / "side-by-side.png").stat().st_size > 10_000


def test_a_signal_that_never_reaches_the_target_has_no_ratio() -> None:
    summaries = {"direct": {"thumbs_to_target": None, "loop_wall_s": 100.0}}
    summaries["both"] = {"thumbs_to_target": 256, "loop_wall_s": 120.0}
    assert loop_compare.ratios(summaries)["both"] == {"ratings_ratio": None, "wall_ratio": 1.2}


def test_refined_versions_carry_their_parents_ratings_and_each_batch_is_judged_by_its_last_version() -> None:
    from benchmarks.loop import batch_ends, version_rows
    from thumbtune.cli.simulate import Rating, Report
    from thumbtune.core.contract import AdapterManifest

    def rating(at: float, served_by: str, event: str) -> Rating:
        return Rating(at, at + 1, served_by, "p", ["a"], [True], {}, False, [event], [1])

    report = Report()
    report.started_at = 100.0
    # e1, e2 rated on v0; v1 trains on them, v2 and v3 refine it; e3 is answered by v3 (v1 and v2 never
    # served), v4 trains on it
    report.ratings = [rating(101, "v0", "e1"), rating(102, "v0", "e2"), rating(120, "v3", "e3")]

    def manifest(version: str, events: list[str]) -> AdapterManifest:
        n = int(version[1:])
        return AdapterManifest(
            version=version,
            parent=f"v{n - 1}",
            base_model="m",
            base_fingerprint="f",
            created_at=100.0 + 5 * n,
            event_count=len(events),
            event_ids=events,
        )

    old = manifest("v0", [])  # from before the run: no events of ours, no rating since
    manifests = [
        old,
        manifest("v1", ["e1", "e2"]),
        manifest("v2", []),
        manifest("v3", []),
        manifest("v4", ["e3"]),
    ]
    rows = version_rows(report, manifests, report.started_at)
    assert [(r["version"], r["thumbs"], r["events"]) for r in rows] == [
        ("v1", 2, 2),
        ("v2", 2, 0),
        ("v3", 2, 0),
        ("v4", 3, 1),
    ]
    # v1's ratings went live with v3, the first version after it that answered: 120 - 103 s
    assert [r["feedback_to_live_s"] for r in rows] == [17.0, None, None, None]
    assert [r["version"] for r in batch_ends(rows)] == ["v3", "v4"]
