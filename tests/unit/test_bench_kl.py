"""`thumbtune bench kl-penalty` on the tiny model: the three per-answer KL sums of a stored version."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.kl_penalty import run
from learner.policy import ADAPTER_NAME, Policy
from thumbtune.core.base_model import load_base
from thumbtune.core.settings import Settings


def even_length(prompt: str, response: str) -> bool:
    return len(response) % 2 == 0


@pytest.mark.usefixtures("single_thread")
def test_kl_sums_are_zero_for_the_empty_adapter_and_positive_once_it_moves(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = Settings(model=str(tiny_model_dir), cache_dir=tmp_path / "cache")
    policy = Policy.fresh(load_base(settings).model, settings, torch.device("cpu"))
    policy.model.save_pretrained(str(tmp_path / "store" / "v0"), selected_adapters=[ADAPTER_NAME])
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    policy.model.save_pretrained(str(tmp_path / "store" / "v1"), selected_adapters=[ADAPTER_NAME])

    results = run(
        settings,
        tmp_path / "store",
        ["v0", "v1"],
        rule="tests.unit.test_bench_kl:even_length",
        answers=8,
        max_tokens=6,
        out=tmp_path / "kl.json",
    )
    assert (tmp_path / "kl.json").is_file()
    empty, moved = results["v0"], results["v1"]
    assert empty["answers"] == moved["answers"] == 8
    for name in ("k1", "k3", "exact"):  # B = 0: the adapter is the base, every estimate is exactly 0
        assert empty[name]["mean"] == 0 and empty[name]["std"] == 0
    assert moved["exact"]["mean"] > 0 and moved["k3"]["mean"] > 0  # both are >= 0 per token
    with pytest.raises(ValueError, match="no adapter v9"):
        run(settings, tmp_path / "store", ["v9"], rule="tests.unit.test_bench_kl:even_length")
