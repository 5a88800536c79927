"""What the policy trains on (learner/rollout.py, learner/ptx.py, `Learner.signal`): the learner's own answers
scored by the reward model, the fallback to human ratings while that model is poor, and the pretraining mix.
Hand-computed numbers for the math; the tiny model for the learner."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from learner.config import LearnerSettings
from learner.policy import Batch, Policy, Sample
from learner.ptx import PretrainingMix, load_passages
from learner.reward_model import Ensemble
from learner.rollout import PromptPool, leave_one_out, pessimistic_reward, sample_with_logprobs
from learner.trainer import Learner
from learner.update import LearnerState, normalised_scores, ppo_update
from tests.support.learner import (
    SMALL_BATCHES,
    make_event,
    make_prompts,
    sample_events,
    tiny_base,
    tiny_learner,
)
from thumbtune.core.chat import end_token_ids
from thumbtune.core.settings import Settings

pytestmark = pytest.mark.usefixtures("single_thread")


def test_leave_one_out_subtracts_the_mean_of_the_other_answers_to_the_same_prompt() -> None:
    s = torch.tensor([[1.0, 0.0, -1.0, 0.6], [0.2, 0.2, 0.2, 0.2]])
    # answer 0 of prompt 0: 1 - (0 - 1 + 0.6) / 3 = 1.1333; a prompt whose answers all score alike: 0
    expected = torch.tensor([[1 + 0.4 / 3, 0 - 0.6 / 3, -1 - 1.6 / 3, 0.6 - 0 / 3], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(leave_one_out(s), expected)


def test_the_pessimistic_reward_is_the_expected_thumb_of_mean_minus_kappa_spread() -> None:
    ensemble = Ensemble(heads=2, dim=1)
    ensemble.weight = torch.tensor([[1.0], [3.0]])  # on features 1.0 the heads say 1 and 3: mean 2, std 1.414
    reward, spread = pessimistic_reward(ensemble, torch.tensor([[1.0]]), kappa=1.0)
    assert spread.item() == pytest.approx(math.sqrt(2))
    assert reward.item() == pytest.approx(2 / (1 + math.exp(-(2 - math.sqrt(2)))) - 1)
    assert pessimistic_reward(ensemble, torch.tensor([[1.0]]), kappa=0.0)[0].item() == pytest.approx(
        2 / (1 + math.exp(-2)) - 1
    )


def test_rollout_rewards_are_scaled_by_their_own_std_human_rewards_by_the_running_moments() -> None:
    def sample(reward: float, centred: bool) -> Sample:
        return Sample("s", [1, 2], [3], [-0.5], 1.0, reward, centred)

    batch = Batch.from_samples(
        [sample(1.0, False), sample(-1.0, False), sample(1.0, False), sample(0.3, True), sample(-0.1, True)],
        pad_id=0,
    )
    state = LearnerState(optimizer=None, kl_controller=None)  # type: ignore[arg-type]
    scores = normalised_scores(batch, state, LearnerSettings())
    mean, std = 1 / 3, math.sqrt(((2 / 3) ** 2 * 2 + (4 / 3) ** 2) / 2)  # the three human rewards only
    own_std = math.sqrt((0.2**2 + 0.2**2) / 1)  # 0.3 and -0.1 around their mean 0.1, n - 1 = 1
    assert state.reward_moments.count == 3 and state.reward_moments.mean == pytest.approx(mean)
    expected = [(1 - mean) / std, (-1 - mean) / std, (1 - mean) / std, 0.3 / own_std, -0.1 / own_std]
    torch.testing.assert_close(scores, torch.tensor(expected))


def test_the_prompt_pool_keeps_the_newest_distinct_prompts_and_survives_a_restart(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    base = tiny_base(tiny_model_dir, tmp_path)
    pool = PromptPool(capacity=3)
    pool.add([make_event(base, p, [5], [-1.0], 1.0) for p in ([1], [2], [1], [3], [4])])
    assert pool.state_dict() == [[1], [3], [4]]  # [2] was the oldest; [1] was sent again
    drawn = pool.draw(2, torch.Generator().manual_seed(0))
    assert (
        len(drawn) == 2 and len({tuple(p) for p in drawn}) == 2 and all(p in pool.state_dict() for p in drawn)
    )
    assert sorted(pool.draw(10, torch.Generator())) == [[1], [3], [4]]
    again = PromptPool(capacity=2)
    again.load_state_dict(pool.state_dict())
    assert again.state_dict() == [[3], [4]]


def test_sampled_log_probs_are_the_policys_at_the_sampling_temperature(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    base = tiny_base(tiny_model_dir, tmp_path, sharpen=10.0)
    policy = Policy.fresh(base.model, Settings(model=str(tiny_model_dir)), torch.device("cpu"))
    prompts = make_prompts(3, 5, seed=4) + [[11, 12]]  # unequal lengths: left padding
    torch.manual_seed(0)
    eos = end_token_ids(base.model, base.tokenizer)
    answers = sample_with_logprobs(policy.model, prompts, pad=0, eos=eos, max_tokens=6, temperature=0.7)
    samples = [
        Sample(str(i), p, r, lp, 0.7, 0.0)
        for i, (p, (r, lp)) in enumerate(zip(prompts, answers, strict=True))
    ]
    batch = Batch.from_samples(samples, pad_id=0)
    with torch.no_grad():
        out = policy.forward_batch(batch, with_values=False, tempered=True)
    torch.testing.assert_close(out.tempered_logprobs, batch.behaviour_logprobs, atol=1e-4, rtol=0)
    assert all(1 <= len(r) <= 6 and (len(r) == 6 or r[-1] in eos) for r, _ in answers)


def rated(learner: Learner, seed: int, reward=lambda r: 1.0 if r[0] % 2 else -1.0) -> list:  # noqa: ANN001
    return sample_events(
        learner.policy,
        learner.base,
        make_prompts(4, 4, seed=seed),
        4,
        5,
        reward,
        torch.Generator().manual_seed(seed),
    )


@pytest.mark.parametrize("signal", ["reward_model", "both"])
def test_once_the_reward_model_is_trusted_the_policy_trains_on_its_own_scored_answers(
    tiny_model_dir: Path, tmp_path: Path, signal: str
) -> None:
    learner = tiny_learner(
        tiny_model_dir,
        tmp_path,
        signal=signal,
        reward_model_window=16,
        reward_model_min_accuracy=0.0,  # any accuracy will do: this test is about what is trained on
        rollout_prompts=3,
        rollout_samples=2,
        rollout_max_tokens=6,
    )
    first = rated(learner, 1)
    m1 = learner.store.read_manifest(learner.train(first))
    # nothing scored yet (the window is empty): human ratings alone, whatever the setting
    assert m1.diagnostics["signal.human_answers"] == 16 and m1.diagnostics["signal.own_answers"] == 0
    assert m1.diagnostics["reward_model.trusted"] == 0
    second = rated(learner, 2)
    m2 = learner.store.read_manifest(learner.train(second))
    d = m2.diagnostics
    assert d["reward_model.trusted"] == 1 and d["signal.own_answers"] == 3 * 2
    assert d["signal.human_answers"] == (16 if signal == "both" else 0)
    assert d["signal.reward_model_share"] == pytest.approx(6 / (6 + d["signal.human_answers"]))
    assert -1 <= d["rollout.reward"] <= 1 and d["rollout.spread"] >= 0 and 1 <= d["rollout.length"] <= 6
    # every human rating is accounted for in the version that consumed it, rollouts never are
    assert m2.event_ids == [e.event_id for e in second] and m2.event_count == 16
    assert len(learner.state.prompts) == 8  # the distinct prompts of both batches


def test_refine_trains_on_own_answers_alone_and_only_with_a_trusted_reward_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = dict(reward_model_window=16, rollout_prompts=2, rollout_samples=2, rollout_max_tokens=6)
    direct = tiny_learner(tiny_model_dir, tmp_path / "direct", signal="direct", **settings)
    direct.train(rated(direct, 1))
    assert direct.refine({"t:0": 16}) is None and direct.version == "v1"  # direct never refines

    learner = tiny_learner(
        tiny_model_dir, tmp_path / "rm", signal="reward_model", reward_model_min_accuracy=0.0, **settings
    )
    assert learner.refine() is None and learner.version == "v0"  # no reward model outcomes, no prompts
    learner.train(rated(learner, 1), {"t:0": 16})
    assert learner.refine() is None  # the first batch trains the reward model, nothing scored it yet
    learner.train(rated(learner, 2), {"t:0": 32})
    assert learner.state.reward_model.trusted(0.0)
    before = [p.detach().clone() for p in learner.policy.parameters()]
    m = learner.store.read_manifest(learner.refine({"t:0": 32}))
    assert m.version == "v3" and m.parent == "v2" and learner.version == "v3"
    # no human rating in it: exactly-once accounting is the parent's, offsets unchanged
    assert m.event_ids == [] and m.event_count == 0 and m.offsets == {"t:0": 32}
    d = m.diagnostics
    assert d["signal.refine"] == 1 and d["signal.human_answers"] == 0 and d["signal.own_answers"] == 4
    assert d["signal.reward_model_share"] == 1
    assert any(not torch.equal(b, p) for b, p in zip(before, learner.policy.parameters(), strict=True))
    assert learner.store.versions() == ["v1", "v2", "v3"]


def test_the_learner_falls_back_to_human_ratings_while_the_reward_model_is_poor(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # the parity of the first answer token: no linear head on the base's hidden states predicts it
    learner = tiny_learner(tiny_model_dir, tmp_path, signal="reward_model", reward_model_window=16)
    for seed in range(1, 5):
        manifest = learner.store.read_manifest(learner.train(rated(learner, seed)))
        d = manifest.diagnostics
        assert d["signal.own_answers"] == 0 and d["signal.human_answers"] == 16, d
        assert d["reward_model.trusted"] == 0
    assert d["reward_model.recent_accuracy"] < 0.7  # (seen: ~0.5)
    # the same ratings with the floor at 0: the model is trusted, and the policy trains on its own answers
    model = learner.state.reward_model
    assert model.trusted(0.0) and not model.trusted(0.7)
    model.recent.extend([1.0] * 16)
    assert model.trusted(0.7) and learner.signal() == "reward_model"


def test_the_pretraining_mix_pulls_the_policy_toward_its_passages(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    base = tiny_base(tiny_model_dir, tmp_path)
    mix = PretrainingMix(base.tokenizer)
    assert len(mix.passages) == 30 and all(2 <= len(p) <= 96 for p in mix.passages)
    events = rated(tiny_learner(tiny_model_dir, tmp_path / "a"), 1)
    batch = Batch.from_events(events, base.tokenizer.pad_token_id)

    def nll_after(ptx_coef: float) -> float:
        cfg = LearnerSettings(**SMALL_BATCHES, ptx_coef=ptx_coef, ptx_batch=4, lr=5e-3)
        policy = Policy.fresh(base.model, Settings(model=str(tiny_model_dir)), torch.device("cpu"))
        state = LearnerState.create(policy, cfg, seed=0)
        for _ in range(3):
            diagnostics = ppo_update(policy, batch, state, cfg, mix)
        assert ("ptx_nll" in diagnostics) == (ptx_coef > 0)
        passages = mix.batch(16, torch.Generator().manual_seed(9))
        with torch.no_grad():
            out = policy.forward_batch(passages, with_values=False)
        policy.model.unload()  # the tiny base again, for the next policy
        return float(-(out.logprobs * passages.mask).sum() / passages.mask.sum())

    assert nll_after(5.0) < nll_after(0.0) - 0.05


def test_a_missing_or_empty_pretraining_text_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read the pretraining-mix text"):
        load_passages(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="holds no passage"):
        load_passages(tmp_path / "empty.txt")
