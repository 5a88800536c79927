"""bench soak end to end, briefly, on the tiny model: versions swap, the broker freezes and thaws, and
every accepted rating reaches the topic exactly once."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.soak import run


def test_a_short_soak_swaps_versions_and_loses_no_rating(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THUMBTUNE_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("THUMBTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("THUMBTUNE_NUM_THREADS", "1")
    results = run(
        tmp_path / "soak",
        minutes=0.4,
        swap_every=3.0,
        clients=2,
        max_tokens=4,
        pause_s=4.0,
        window_s=8.0,
        warmup_s=0.0,
        adapters=2,
    )
    live = [s for s in results["swaps"] if s["outcome"] == "live"]
    assert len(live) >= 4 and len(live) == len(results["swaps"])
    ratings = results["ratings"]
    assert ratings["accepted"] >= 10 and ratings["lost"] == 0 and ratings["duplicated"] == 0
    assert sum(w["5xx"] for w in results["windows"]) == 0
    assert results["pause"]["seconds"] >= 4.0 and len(results["rss"]) >= 3
    assert (tmp_path / "soak" / "results.json").is_file()
