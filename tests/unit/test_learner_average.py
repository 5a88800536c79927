"""Polyak-averaged publishing (THUMBTUNE_LEARNER_AVERAGE_DECAY): the math, and the learner on the tiny model
writing the average as the adapter while it trains on, and resumes from, the trained weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from learner.average import WeightAverage, load_trained_weights, lora_parameters
from learner.config import LearnerSettings
from learner.policy import ADAPTER_NAME, Policy
from learner.replay import run_from_file
from learner.trainer import Learner
from tests.support.learner import make_prompts, sample_events, tiny_base
from thumbtune.core.contract import ADAPTER_WEIGHTS, LEARNER_STATE
from thumbtune.core.settings import Settings
from thumbtune.core.store import LocalAdapterStore

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_average_is_an_exponential_moving_average_and_published_swaps_it_in_and_out() -> None:
    p = torch.nn.Parameter(torch.tensor([0.0, 2.0]))
    avg = WeightAverage({"p": p}, decay=0.75)
    with torch.no_grad():
        p.copy_(torch.tensor([4.0, 2.0]))
    gap = avg.update()  # w = 0.75 * [0, 2] + 0.25 * [4, 2] = [1, 2]
    assert torch.equal(avg.shadow["p"], torch.tensor([1.0, 2.0]))
    assert gap == pytest.approx(3.0 / 5**0.5)  # ||[4, 2] - [1, 2]|| / ||[1, 2]||
    with avg.published():
        assert torch.equal(p.detach(), torch.tensor([1.0, 2.0]))
        with pytest.raises(RuntimeError, match="inside published"):
            avg.update()
        with pytest.raises(RuntimeError, match="does not nest"), avg.published():
            pass
    assert torch.equal(p.detach(), torch.tensor([4.0, 2.0]))  # theta back, also after an exception:
    with pytest.raises(ValueError, match="boom"), avg.published():
        raise ValueError("boom")
    assert torch.equal(p.detach(), torch.tensor([4.0, 2.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        WeightAverage({"p": p}, decay=1.0)


def test_saved_trained_weights_must_fit_the_adapter() -> None:
    params = {"a": torch.nn.Parameter(torch.zeros(2, 3))}
    with pytest.raises(RuntimeError, match="missing"):
        load_trained_weights(params, {"b": torch.zeros(2, 3)})
    with pytest.raises(RuntimeError, match=r"\(3, 2\)"):
        load_trained_weights(params, {"a": torch.zeros(3, 2)})
    load_trained_weights(params, {"a": torch.ones(2, 3)})
    assert torch.equal(params["a"].detach(), torch.ones(2, 3))


@pytest.fixture
def settings(tiny_model_dir: Path, tmp_path: Path) -> Settings:
    return Settings(
        model=str(tiny_model_dir), cache_dir=tmp_path / "cache", adapter_store=str(tmp_path / "adapters")
    )


def _events_file(settings: Settings, tiny_model_dir: Path, tmp_path: Path, n: int) -> Path:
    base = tiny_base(tiny_model_dir, tmp_path)
    policy = Policy.fresh(base.model, settings, torch.device("cpu"))
    events = sample_events(
        policy,
        base,
        make_prompts(n // 4, 4, seed=0),
        4,
        5,
        lambda r: 1.0 if r[0] % 2 else -1.0,
        torch.Generator().manual_seed(0),
    )
    path = tmp_path / "events.jsonl"
    path.write_text("".join(e.model_dump_json() + "\n" for e in events))
    return path


def _stored(store: LocalAdapterStore, version: str) -> tuple[dict, dict]:
    """(adapter file tensors, learner_state.pt) of a stored version."""
    adapter = load_file(str(store.path(version) / ADAPTER_WEIGHTS))
    state = torch.load(store.path(version) / LEARNER_STATE, map_location="cpu", weights_only=True)
    return adapter, state


def _by_suffix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's file names drop the adapter name: key both sides by the module path and lora_A/lora_B."""
    out = {}
    for name, t in tensors.items():
        parts = [p for p in name.split(".") if p not in (ADAPTER_NAME, "weight", "base_model", "model")]
        out[".".join(parts)] = t
    return out


def test_the_learner_publishes_the_average_and_trains_and_resumes_from_theta(
    settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    path = _events_file(settings, tiny_model_dir, tmp_path, 24)
    learner_settings = LearnerSettings(
        batch_size=8, min_batch=8, epochs=2, minibatch_size=4, lr=1e-2, average_decay=0.5
    )
    store = LocalAdapterStore(settings.adapter_store_path)

    assert run_from_file(settings, learner_settings, path, once=True) == ["v1", "v2", "v3"]
    previous = None
    for version in ("v1", "v2", "v3"):
        adapter, state = _stored(store, version)
        published, trained = _by_suffix(adapter), _by_suffix(state["trained_weights"])
        assert published.keys() == trained.keys() and published
        if previous is None:
            previous = _by_suffix(
                dict(
                    lora_parameters(
                        Policy.fresh(
                            tiny_base(tiny_model_dir, tmp_path).model, settings, torch.device("cpu")
                        ).model
                    )
                )
            )
        for name, w in published.items():  # w_k = 0.5 w_{k-1} + 0.5 theta_k
            torch.testing.assert_close(w, 0.5 * previous[name].detach() + 0.5 * trained[name])
        assert any(not torch.equal(published[n], trained[n]) for n in published)  # theta ran ahead
        previous = published
        assert store.read_manifest(version).diagnostics["average_gap"] > 0

    # a restarted learner trains on from theta_3 and averages on from the published w_3
    learner = Learner(settings, learner_settings)
    _, state = _stored(store, "v3")
    resumed = _by_suffix(dict(lora_parameters(learner.policy.model)))
    for name, theta in _by_suffix(state["trained_weights"]).items():
        torch.testing.assert_close(resumed[name].detach(), theta)
    shadow = _by_suffix(learner.state.average.shadow)
    for name, w in published.items():
        torch.testing.assert_close(shadow[name], w)


def test_without_averaging_the_adapter_file_is_the_trained_weights(
    settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    path = _events_file(settings, tiny_model_dir, tmp_path, 8)
    learner_settings = LearnerSettings(
        batch_size=8, min_batch=8, epochs=1, minibatch_size=8, lr=1e-2, average_decay=0.0
    )
    assert run_from_file(settings, learner_settings, path, once=True) == ["v1"]
    store = LocalAdapterStore(settings.adapter_store_path)
    adapter, state = _stored(store, "v1")
    assert "trained_weights" not in state and "average_gap" not in store.read_manifest("v1").diagnostics
    learner = Learner(settings, learner_settings)
    assert learner.state.average is None
    resumed = _by_suffix(dict(lora_parameters(learner.policy.model)))
    for name, w in _by_suffix(adapter).items():
        torch.testing.assert_close(resumed[name].detach(), w)
