"""The learner fits its reward model on every batch of human ratings, scored first, and keeps it with each
version: on the tiny model, through `Learner.train` and `load_latest`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from learner.checkpoint import load_latest, new_state
from learner.policy import FEATURE_BLOCKS, Batch, Policy, features
from learner.reward_model import RewardModel
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
    assert heads["weight"].shape == (4, 4 * 64)  # 4 heads on [h_T ; hbar ; xbar ; hbar * xbar], hidden 64
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


def test_the_features_are_the_middle_layers_last_token_and_means_of_answer_and_prompt(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    learner = tiny_learner(tiny_model_dir, tmp_path)
    events = rated_events(tiny_model_dir, tmp_path, 5)
    batch = Batch.from_events(events, learner.pad_id)
    phi = features(learner.policy, batch)
    assert phi.shape == (len(events), FEATURE_BLOCKS * 64)
    body = learner.policy.model.get_base_model().base_model
    layers = learner.policy.model.config.num_hidden_layers
    for i, e in enumerate(events[:3]):
        ids = torch.tensor([e.prompt_token_ids + e.response_token_ids])
        with torch.no_grad():
            h = body(input_ids=ids, output_hidden_states=True).hidden_states[layers // 2][0]
        s, t = len(e.prompt_token_ids), len(e.response_token_ids)
        answer, prompt = h[s : s + t].mean(0), h[:s].mean(0)
        expected = torch.cat([h[s + t - 1], answer, prompt, answer * prompt])
        torch.testing.assert_close(phi[i], expected, atol=1e-4, rtol=1e-4)
    calls = []
    top = body.layers[-1].register_forward_hook(lambda *_: calls.append(1))
    try:
        torch.testing.assert_close(features(learner.policy, batch), phi)
    finally:
        top.remove()
    assert layers // 2 < layers and calls == []  # the pass stopped after the middle layer
    final = features(learner.policy, batch, layer=-1, prompt=False)  # phi before: [h_T ; hbar], final states
    assert final.shape == (len(events), 2 * 64) and not torch.allclose(final, phi[:, : 2 * 64])


def test_a_reward_model_fitted_on_other_features_is_started_afresh(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A learner state from before phi changed (2 x hidden wide): the weights and everything else resume, the
    reward model relearns from the next ratings instead of failing the start."""
    learner = tiny_learner(tiny_model_dir, tmp_path)
    learner.train(rated_events(tiny_model_dir, tmp_path, 6))
    saved = learner.state.state_dict()
    _, fresh = load_latest(learner.store, learner.base, learner.settings, learner.learner_settings)
    assert len(fresh.reward_model) == 16  # same features: resumed
    old = RewardModel(4, 2 * 64)
    old.observe(rated_events(tiny_model_dir, tmp_path, 7), torch.randn(16, 2 * 64))
    saved["reward_model"] = old.state_dict()
    state = new_state(learner.policy, learner.learner_settings)  # as `resume_state` loads into
    with caplog.at_level("WARNING", logger="learner.update"):
        state.load_state_dict(saved)
    assert len(state.reward_model) == 0 and state.reward_model.ensemble.dim == FEATURE_BLOCKS * 64
    assert state.updates == learner.state.updates
    assert "fitted on 128 features, today's phi has 256" in caplog.text


def test_no_reward_model_when_it_has_no_heads(tiny_model_dir: Path, tmp_path: Path) -> None:
    learner = tiny_learner(tiny_model_dir, tmp_path, reward_model_heads=0)
    version = learner.train(rated_events(tiny_model_dir, tmp_path, 4))
    assert learner.state.reward_model is None
    assert not (learner.store.path(version) / REWARD_MODEL_WEIGHTS).exists()
    assert not any(k.startswith("reward_model.") for k in learner.store.read_manifest(version).diagnostics)
