"""`thumbtune bench poison` for real, one attacked arm on the tiny model: the honest users rate with keys of
their own, the attacker with one more, about half the ratings are its, the learner caps its share in every
update, and the arm is evaluated on the honest ratings alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.poison import run_arm
from thumbtune.core.settings import Settings
from thumbtune.core.store import LocalAdapterStore


def test_an_attacked_arm_caps_the_attackers_share_in_every_update(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "THUMBTUNE_MODEL": str(tiny_model_dir),
        "THUMBTUNE_CACHE_DIR": str(tmp_path / "cache"),
        "THUMBTUNE_MAX_CONTEXT": "512",
        "THUMBTUNE_LEARNER_BATCH_SIZE": "8",
        "THUMBTUNE_LEARNER_MIN_BATCH": "4",
        "THUMBTUNE_NUM_THREADS": "1",  # server and learner run at once: one torch thread each on 2 cores
    }.items():
        monkeypatch.setenv(name, value)  # the embedded system's children read them
    settings = Settings(model=str(tiny_model_dir), cache_dir=tmp_path / "cache", max_context=512)
    out = tmp_path / "caps-on"
    results = run_arm(
        settings,
        "caps-on",
        out=out,
        rule="concise",
        attacker_rule="verbose",
        thumbs=16,
        users=2,
        eval_every=8,
        samples_per_prompt=1,
        temperature=1.0,
        max_tokens=8,
        seed=0,
    )
    config = results["config"]
    assert config["attacker_ratings"] > 0 and 0.25 <= config["attacker_share"] <= 0.75
    honest = [json.loads(line) for line in (out / "ratings.jsonl").read_text().splitlines()]
    assert len(honest) == 16 and results["summary"]["thumbs_used"] <= 16  # x axis: honest ratings only
    store = LocalAdapterStore(out / "adapters")
    manifests = [store.read_manifest(v) for v in store.versions()]
    assert manifests, "the learner wrote no version"
    for m in manifests:  # nobody over the cap (0.2), or over 1/K with K raters in the update (3 at most)
        d = m.diagnostics
        assert d["raters.top_share_capped"] <= max(0.2, 1 / d["raters.update"]) + 1e-6, d
        assert d["raters.window_top_share_capped"] <= max(0.2, 1 / d["raters.window"]) + 1e-6, d
    assert any(
        m.diagnostics["raters.update"] == 3 for m in manifests
    )  # each honest user is a rater of its own
    attacker = [json.loads(line) for line in (out / "attacker-ratings.jsonl").read_text().splitlines()]
    assert {e for r in honest for e in r["event_ids"]}.isdisjoint(
        {e for r in attacker for e in r["event_ids"]}
    )
    assert (out / "results.json").exists() and (out / "learning.png").exists()
