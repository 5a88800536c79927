"""The embedded model's cache: built once even when several processes find it unbuilt at the same time."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from thumbtune.core import base_model
from thumbtune.core.settings import Settings


def test_concurrent_first_loads_dequantize_once_and_never_replace_a_built_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two workers of one benchmark started on a cold cache: the second used to rebuild it and delete the
    # first's directory while the first was reading its tokenizer from it.
    built: list[Path] = []

    def dequantize(target: Path) -> Path:
        built.append(target)
        time.sleep(0.3)  # long enough for the other builder to arrive while this one works
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        (target / base_model.FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": "f"}))
        return target

    monkeypatch.setattr(base_model, "_dequantize_into", dequantize)
    settings = Settings(cache_dir=tmp_path)
    results: list[Path] = []
    workers = [
        threading.Thread(target=lambda: results.append(base_model.build_embedded_cache(settings)))
        for _ in range(3)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(10)
    assert len(built) == 1, built
    assert results == [base_model.embedded_cache_dir(settings)] * 3
    assert base_model.resolve(settings).source == "embedded-cache"
