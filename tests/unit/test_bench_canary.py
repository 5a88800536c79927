"""`thumbtune bench canary`'s accounting (benchmarks/canary.py): which answers each version gave in a
window, and the drill's verdicts. The drill's system is the product's; here its records are made by hand."""

from __future__ import annotations

from benchmarks.canary import WRONG, answers_by_version, report
from thumbtune.cli.simulate import Rating


def rating(sent_at: float, version: str, answers: int) -> Rating:
    return Rating(
        sent_at=sent_at,
        rated_at=sent_at + 1,
        adapter_version=version,
        prompt="q",
        responses=["a"] * answers,
        approved=[True] * answers,
        feedback={},
        flipped=False,
        event_ids=[],
        words=[1] * answers,
    )


def test_a_mixed_compare_request_counts_one_answer_to_each_version() -> None:
    ratings = [rating(1, "v1", 1), rating(2, "v1+v2", 2), rating(3, "v2", 2), rating(9, "v2", 1)]
    assert answers_by_version(ratings, 1, 3) == {"v1": 2.0, "v2": 3.0}
    assert answers_by_version(ratings, 4, 8) == {}


def canary(role: str, outcome: str, ratings: int) -> dict:
    return {
        "role": role,
        "version": "v1" if role == "good" else "v2",
        "outcome": outcome,
        "ratings": ratings,
        "canary_at": 100.0,
        "decided_at": 100.0 + ratings,
        "answers": {"v0": 90.0, "v2": 10.0},
    }


def test_the_summary_counts_right_wrong_and_undecided_canaries() -> None:
    reps = [
        {
            "seed": 1,
            "canaries": [canary("good", "promoted", 40), canary("bad", "rolled back", 60)],
            "wrong": [],
            "bad_share_while_canary": 0.1,
            "bad_share_of_drill": 0.04,
        },
        {
            "seed": 2,
            "canaries": [canary("good", "undecided", 1000), canary("bad", "promoted", 80)],
            "wrong": ["bad"],
            "bad_share_while_canary": 0.2,
            "bad_share_of_drill": 0.08,
        },
    ]
    lines = report({"repetitions": reps})
    assert "good: 1/2 promoted; ratings to the decision median 40, max 40" in lines[-3]
    assert "bad: 1/2 rolled back; ratings to the decision median 60, max 60" in lines[-2]
    assert lines[-1].startswith("wrong decisions: 1 in 2 repetitions")
    assert "of the drill median 6.0% (max 8.0%)" in lines[-1]
    assert "refused at admission" in WRONG["good"] and "refused at admission" not in WRONG["bad"]
