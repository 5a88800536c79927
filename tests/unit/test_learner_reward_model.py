"""The learner fits its reward model on every batch of human ratings, scored first, and keeps it with each
version: on the tiny model, through `Learner.train` and `load_latest`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from learner.checkpoint import load_latest
from learner.policy import Batch, Policy, features
from tests.support.learner import make_prompts, sample_events, tiny_base, tiny_learner
from thumbtune.core.contract import REWARD_MODEL_WEIGHTS
from thumbtune.core.settings import Settings

pytestmark = pytest.mark.usefixtures("single_thread")


def rated_events(tiny_model_dir: Path, tmp_path: Path, seed: int) -> list:
    base = tiny_base(tiny_model_dir, tmp_path)
    policy = Policy.fresh(base.model, Settings(model=str(tiny_model_dir)), torch.device("cpu"))
    return sample_events(
        policy,
        base,
        make_prompts(4, 4, seed=seed),
        4,
        5,
        lambda r: 1.0 if r[0] % 2 else -1.0,
        torch.Generator().manual_seed(seed),
    )


def test_each_batch_is_scored_then_fitted_and_the_model_is_kept_with_the_version(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    learner = tiny_learner(tiny_model_dir, tmp_path)
    first, second = rated_events(tiny_model_dir, tmp_path, 1), rated_events(tiny_model_dir, tmp_path, 2)
    v1 = learner.train(first)
    m1 = learner.store.read_manifest(v1).diagnostics
    assert m1["reward_model.answers"] == 16 and "reward_model.accuracy" not in m1  # nothing to score with yet
    v2 = learner.train(second)
    m2 = learner.store.read_manifest(v2).diagnostics
    assert m2["reward_model.n"] == 16 and 0 <= m2["reward_model.accuracy"] <= 1
    assert m2["reward_model.answers"] == 32 and m2["reward_model.run_accuracy"] == m2["reward_model.accuracy"]
    assert not math.isnan(m2["reward_model.log_loss"]) and m2["reward_model.update_s"] > 0

    heads = load_file(str(learner.store.path(v2) / REWARD_MODEL_WEIGHTS))
    assert heads["weight"].shape == (4, 2 * 64)  # 4 heads on [h_T ; mean h_t] of the tiny model (hidden 64)
    batch = Batch.from_events(second, learner.pad_id)
    phi = features(learner.policy, batch)
    _, state = load_latest(learner.store, learner.base, learner.settings, learner.learner_settings)
    torch.testing.assert_close(state.reward_model.score(phi)[0], learner.state.reward_model.score(phi)[0])
    assert (
        len(state.reward_model) == 32
        and state.reward_model.run_figures() == learner.state.reward_model.run_figures()
    )


def test_the_features_are_the_bases_whatever_the_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    learner = tiny_learner(tiny_model_dir, tmp_path)
    events = rated_events(tiny_model_dir, tmp_path, 3)
    batch = Batch.from_events(events, learner.pad_id)
    before = features(learner.policy, batch)
    learner.train(events)  # the adapter moves; the reward model reads the base
    torch.testing.assert_close(features(learner.policy, batch), before)
    single = features(learner.policy, batch.subset(torch.tensor([2])))  # padding does not change a row
    torch.testing.assert_close(single, before[2:3], atol=1e-4, rtol=1e-4)


def test_no_reward_model_when_it_has_no_heads(tiny_model_dir: Path, tmp_path: Path) -> None:
    learner = tiny_learner(tiny_model_dir, tmp_path, reward_model_heads=0)
    version = learner.train(rated_events(tiny_model_dir, tmp_path, 4))
    assert learner.state.reward_model is None
    assert not (learner.store.path(version) / REWARD_MODEL_WEIGHTS).exists()
    assert not any(k.startswith("reward_model.") for k in learner.store.read_manifest(version).diagnostics)
