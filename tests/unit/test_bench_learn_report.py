"""`thumbtune bench learn`'s report (benchmarks/learn_report.py) with some contenders left out, and the
data-parallel contender's line."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from benchmarks.learn import CONFIG, DESCRIPTIONS, check_contenders
from benchmarks.learn_report import report

INFO = {
    "events": 64,
    "prompt_tokens": {"min": 31, "mean": 33.5, "max": 35},
    "answer_tokens": {"min": 18, "mean": 31.8, "max": 32},
    "stopped_at_eos": 1,
    "sample_s": 16.0,
}


def run(update_s: float, rss_gib: float, **extra: float) -> dict:
    return {
        "update_s": update_s,
        "cpu_s": 2 * update_s,
        "event_epochs_per_s": 256 / update_s,
        "event_epochs_per_cpu_s": 128 / update_s,
        "rss_peak_bytes": int(rss_gib * 2**30),
        "other_cores": 0.02,
        "threads": 2,
    } | extra


def test_ours_and_two_ranks_alone_report_the_ratio_and_the_weight_gap() -> None:
    runs = {
        "ours": [run(80.0, 2.1), run(100.0, 2.1)],
        "ours-2ranks": [
            run(88.0, 4.1, max_weight_diff_vs_ours=3e-7),
            run(110.0, 4.1, max_weight_diff_vs_ours=0.0),
        ],
    }
    out = io.StringIO()
    result = report(Console(file=out, width=200), runs, INFO, False, False, 2, 400.0, DESCRIPTIONS, CONFIG)
    text = out.getvalue()
    assert result["ratios"]["two_ranks_vs_ours"] == 90.0 / 99.0  # medians: ours 90 s, 2 ranks 99 s
    assert result["ratios"]["two_ranks_max_weight_diff"] == 3e-7
    assert (
        result["ratios"]["ours_vs_floor"] is None
        and result["targets"]["ours / floor, event-epochs/s"]["pass"] is None
    )
    assert "0.91x ours' speed" in text and "within 3.00e-07 of ours" in text


def test_contenders_must_be_known_and_include_ours() -> None:
    check_contenders(None)
    check_contenders(["ours", "ours-2ranks"])
    for bad in (["ours-2ranks"], ["ours", "tlr"]):
        with pytest.raises(ValueError, match="ours included"):
            check_contenders(bad)
