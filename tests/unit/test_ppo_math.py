"""learner/ppo.py, learner/kl.py and thumbtune/core/divergence.py against hand-computed numbers (the
arithmetic is in the comments)."""

import math

import numpy as np
import pytest
import torch

from learner.config import PPOConfig
from learner.kl import AdaptiveKLController, FixedKLController
from learner.ppo import (
    RunningMoments,
    effective_sample_size,
    entropy_from_logits,
    explained_variance,
    gae,
    last_token_mask,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    ppo_minibatch_loss,
    sequence_kl,
    token_rewards,
    truncated_importance_weights,
    value_loss,
)
from thumbtune.core.divergence import exact_kl, kl_k1, kl_k2, kl_k3

D = torch.float64


def t(rows):
    return torch.tensor(rows, dtype=D)


# Row 0 has 3 response tokens; row 1 has 2 and one padding position holding garbage.
MASK = t([[1, 1, 1], [1, 1, 0]])


def test_gae_on_three_tokens_with_gamma_1_lam_095_ignores_right_padding():
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])  # 5.0 is padding
    values = t([[0.5, 0.6, 0.7], [1.0, 0.5, 9.0]])  # 9.0 is padding
    advantages, returns = gae(rewards, values, MASK, gamma=1.0, lam=0.95)
    # Row 0: delta_2 = 1 + 0 - 0.7 = 0.3 (V after the last token is 0)
    #        delta_1 = 0 + 0.7 - 0.6 = 0.1;  delta_0 = 0 + 0.6 - 0.5 = 0.1
    #        A_2 = 0.3;  A_1 = 0.1 + 0.95 * 0.3 = 0.385;  A_0 = 0.1 + 0.95 * 0.385 = 0.46575
    #        returns = A + V = [0.96575, 0.985, 1.0]
    # Row 1: delta_1 = 2 + 0 - 0.5 = 1.5 (the padded 9.0 is not bootstrapped from)
    #        delta_0 = 0 + 0.5 - 1.0 = -0.5;  A_1 = 1.5;  A_0 = -0.5 + 0.95 * 1.5 = 0.925
    #        returns = [1.925, 2.0, 0]
    torch.testing.assert_close(advantages, t([[0.46575, 0.385, 0.3], [0.925, 1.5, 0.0]]))
    torch.testing.assert_close(returns, t([[0.96575, 0.985, 1.0], [1.925, 2.0, 0.0]]))


def test_gae_with_lam_1_gives_monte_carlo_returns():
    rewards = t([[0.1, -0.2, 1.0], [0.3, 2.0, 0.0]])
    values = t([[0.5, 0.6, 0.7], [1.0, 0.5, 0.0]])
    _, returns = gae(rewards, values, MASK, gamma=1.0, lam=1.0)
    # Row 0: 0.1 - 0.2 + 1 = 0.9, -0.2 + 1 = 0.8, 1.0; row 1: 2.3, 2.0
    torch.testing.assert_close(returns, t([[0.9, 0.8, 1.0], [2.3, 2.0, 0.0]]))


def test_token_rewards_put_the_score_on_the_last_valid_token_and_a_kl_penalty_everywhere():
    score = t([1.0, -2.0])
    logprobs_old = t([[-1.0, -2.0, -0.5], [-1.0, -1.0, 7.0]])
    logprobs_ref = t([[-1.5, -2.0, -1.0], [-0.8, -1.2, 3.0]])
    rewards = token_rewards(score, logprobs_old, logprobs_ref, MASK, beta=0.1)
    # Row 0: kl = old - ref = [0.5, 0, 0.5] -> -0.1 * kl = [-0.05, 0, -0.05]; + R = 1 at t = 2
    # Row 1: kl = [-0.2, 0.2] -> [0.02, -0.02]; + R = -2 at t = 1; padding 0
    torch.testing.assert_close(rewards, t([[-0.05, 0.0, 0.95], [0.02, -2.02, 0.0]]))
    # sequence KL in nats: row 0: 0.5 + 0 + 0.5 = 1.0; row 1: -0.2 + 0.2 = 0
    torch.testing.assert_close(sequence_kl(logprobs_old, logprobs_ref, MASK), t([1.0, 0.0]))


def test_the_k3_penalty_is_rho_minus_1_minus_log_rho_and_never_negative():
    score = t([1.0, -2.0])
    logprobs_old = t([[-1.0, -2.0, -0.5], [-1.0, -1.0, 7.0]])
    logprobs_ref = t([[-1.5, -2.0, -1.0], [-0.8, -1.2, 3.0]])
    rewards = token_rewards(score, logprobs_old, logprobs_ref, MASK, beta=0.1, estimator="k3")
    # log rho = ref - old: row 0 [-0.5, 0, -0.5], row 1 [0.2, -0.2]; k3 = e^x - 1 - x
    k3 = lambda x: math.exp(x) - 1 - x  # noqa: E731
    row0 = [-0.1 * k3(-0.5), 0.0, -0.1 * k3(-0.5) + 1.0]
    row1 = [-0.1 * k3(0.2), -0.1 * k3(-0.2) - 2.0, 0.0]
    expected = t([row0, row1])
    torch.testing.assert_close(rewards, expected)
    assert (rewards - score.unsqueeze(1) * last_token_mask(MASK) <= 0).all()  # a penalty, never a bonus
    with pytest.raises(ValueError, match="k2"):
        token_rewards(score, logprobs_old, logprobs_ref, MASK, beta=0.1, estimator="k2")


def test_last_token_mask_is_empty_for_an_empty_row():
    mask = t([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(last_token_mask(mask), t([[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]))


# Five valid tokens and one padding position; eps = 0.2.
#   t0: A = +1, rho = 1.5  clipped, pessimistic side: max(-1.5, -1.2) = -1.2, gradient 0
#   t1: A = -1, rho = 0.5  clipped, pessimistic side: max( 0.5,  0.8) =  0.8, gradient 0
#   t2: A = +2, rho = 1.1  inside the clip range:     -2 * 1.1          = -2.2
#   t3: A = +1, rho = 0.5  outside, optimistic side:  max(-0.5, -0.8) = -0.5 (unclipped)
#   t4: A = -1, rho = 1.5  outside, optimistic side:  max( 1.5,  1.2) =  1.5 (unclipped)
# loss = (-1.2 + 0.8 - 2.2 - 0.5 + 1.5) / 5 = -1.6 / 5 = -0.32
ADV = t([[1.0, -1.0, 2.0, 1.0, -1.0, 3.0]])
RHO = [1.5, 0.5, 1.1, 0.5, 1.5, 4.0]
PG_MASK = t([[1, 1, 1, 1, 1, 0]])


def _policy_inputs():
    logprobs_old = t([[-1.0, -2.0, -0.5, -1.5, -3.0, 0.0]])
    logprobs_new = (logprobs_old + torch.log(t([RHO]))).requires_grad_(True)
    return logprobs_new, logprobs_old


def test_clipped_surrogate_value_clipfrac_and_approx_kl():
    logprobs_new, logprobs_old = _policy_inputs()
    loss, clipfrac, approx_kl = policy_loss(logprobs_new, logprobs_old, ADV, PG_MASK, clip_eps=0.2)
    torch.testing.assert_close(loss, t(-0.32))
    # |rho - 1| > 0.2 at t0, t1, t3, t4 -> 4 / 5
    torch.testing.assert_close(clipfrac, t(0.8))
    # k3 = (rho - 1) - log rho, averaged over the 5 valid tokens
    k3 = [(r - 1) - math.log(r) for r in RHO[:5]]
    torch.testing.assert_close(approx_kl, t(sum(k3) / 5))


def test_clipped_surrogate_gradient_is_zero_where_clipped_on_the_pessimistic_side_only():
    logprobs_new, logprobs_old = _policy_inputs()
    loss, _, _ = policy_loss(logprobs_new, logprobs_old, ADV, PG_MASK, clip_eps=0.2)
    loss.backward()
    # d/dlogp of -A * rho is -A * rho; divided by the 5 valid tokens:
    #   t2: -2 * 1.1 / 5 = -0.44;  t3: -1 * 0.5 / 5 = -0.1;  t4: +1 * 1.5 / 5 = 0.3
    torch.testing.assert_close(logprobs_new.grad, t([[0.0, 0.0, -0.44, -0.1, 0.3, 0.0]]))
    assert logprobs_new.grad[0, 0] == 0 and logprobs_new.grad[0, 1] == 0


def test_importance_weights_scale_each_tokens_surrogate():
    logprobs_new, logprobs_old = _policy_inputs()
    weights = t([[0.5, 1.0, 0.25, 1.0, 1.0, 0.0]])
    loss, _, _ = policy_loss(logprobs_new, logprobs_old, ADV, PG_MASK, 0.2, is_weights=weights)
    # (0.5 * -1.2 + 0.8 + 0.25 * -2.2 - 0.5 + 1.5) / 5 = (-0.6 + 0.8 - 0.55 - 0.5 + 1.5) / 5 = 0.65 / 5
    torch.testing.assert_close(loss, t(0.13))


def test_value_loss_is_clipped_around_the_old_value():
    values_old = t([[0.0, 0.0, 0.0, 0.0]])
    values_new = t([[1.0, 0.1, -1.0, 5.0]])
    returns = t([[1.0, 1.0, -0.5, 0.0]])
    mask = t([[1, 1, 1, 0]])
    # t0: unclipped (1 - 1)^2 = 0;   clipped V = 0 + 0.2 -> (0.2 - 1)^2 = 0.64; max 0.64
    # t1: unclipped (0.1 - 1)^2 = 0.81; 0.1 is inside the range -> 0.81;       max 0.81
    # t2: unclipped (-1 + 0.5)^2 = 0.25; clipped V = -0.2 -> (-0.2 + 0.5)^2 = 0.09; max 0.25
    # loss = 0.5 * (0.64 + 0.81 + 0.25) / 3 = 0.5 * 1.7 / 3
    loss = value_loss(values_new, values_old, returns, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, t(0.5 * 1.7 / 3))


def test_kl_estimators_k1_and_k3_are_unbiased_and_k3_is_never_negative():
    p = t([0.5, 0.3, 0.2])
    q = t([0.3, 0.3, 0.4])
    # exact KL(p || q) = 0.5 ln(5/3) + 0.3 ln 1 + 0.2 ln(0.5) = 0.25541 - 0.13863 = 0.11678
    exact = (p * (p / q).log()).sum()
    torch.testing.assert_close(exact, t(0.5 * math.log(5 / 3) + 0.2 * math.log(0.5)))
    generator = torch.Generator().manual_seed(0)
    x = torch.multinomial(p, 200_000, replacement=True, generator=generator)
    logp, logq = p.log()[x], q.log()[x]
    # std of k1 is ~0.46, so the mean of 200k samples has a standard error of ~0.001
    assert abs(kl_k1(logp, logq).mean() - exact) < 0.005
    assert abs(kl_k3(logp, logq).mean() - exact) < 0.005
    assert (kl_k3(logp, logq) >= 0).all()
    assert (kl_k1(logp, logq) < 0).any()  # k1 is unbiased only on average
    # k2 = r^2 / 2: at x = 0, r = ln(0.3 / 0.5)
    torch.testing.assert_close(kl_k2(p.log()[:1], q.log()[:1]), t([0.5 * math.log(0.6) ** 2]))


def test_adaptive_kl_controller_moves_beta_by_the_clipped_proportional_error():
    controller = AdaptiveKLController(init_beta=0.05, target=6.0, horizon=10000)
    # kl 9: e = 9 / 6 - 1 = 0.5 -> clipped to 0.2; beta = 0.05 * (1 + 0.2 * 16 / 10000) = 0.050016
    controller.update(9.0, n_steps=16)
    assert controller.value == pytest.approx(0.050016)
    # kl 6.6: e = 0.1; beta = 0.050016 * (1 + 0.1 * 16 / 10000) = 0.050016 * 1.00016
    controller.update(6.6, n_steps=16)
    assert controller.value == pytest.approx(0.050016 * 1.00016)
    # kl 0: e = -1 -> clipped to -0.2; 1000 sequences: beta * (1 - 0.2 * 0.1) = beta * 0.98
    before = controller.value
    controller.update(0.0, n_steps=1000)
    assert controller.value == pytest.approx(before * 0.98)
    restored = AdaptiveKLController(init_beta=0.05, target=6.0, horizon=10000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value


def test_fixed_kl_controller_never_moves():
    controller = FixedKLController(0.05)
    controller.update(100.0, n_steps=10_000)
    controller.load_state_dict({"value": 3.0})
    assert controller.value == 0.05


def test_importance_weights_are_one_on_policy_shrink_off_policy_and_never_exceed_c():
    logprobs_old = t([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    on_policy = truncated_importance_weights(logprobs_old, logprobs_old.clone(), MASK, c=1.0)
    assert torch.equal(on_policy, MASK)  # exactly 1 on valid tokens, 0 on padding
    # pi_old < pi_b by 0.5 nats -> w = e^-0.5 ~ 0.607;  pi_old > pi_b by 1 nat -> truncated to c = 1
    behaviour = t([[-0.5, -3.0, -0.5], [-1.0, -1.0, 50.0]])
    weights = truncated_importance_weights(logprobs_old, behaviour, MASK, c=1.0)
    torch.testing.assert_close(weights, t([[math.exp(-0.5), 1.0, 1.0], [1.0, 1.0, 0.0]]))
    random_old, random_b = torch.randn(4, 50, dtype=D), torch.randn(4, 50, dtype=D)
    mask = torch.ones(4, 50, dtype=D)
    assert truncated_importance_weights(random_old, random_b, mask, c=1.0).max() <= 1.0
    assert truncated_importance_weights(random_old, random_b, mask, c=0.7).max() <= 0.7
    assert not truncated_importance_weights(random_old.requires_grad_(True), random_b, mask).requires_grad


def test_effective_sample_size_is_one_for_equal_weights_and_shrinks_for_unequal():
    mask = t([[1, 1, 1, 0]])
    torch.testing.assert_close(effective_sample_size(t([[0.3, 0.3, 0.3, 9.0]]), mask), t(1.0))
    # weights [1, 1, 0]: (1 + 1)^2 / (3 * (1 + 1)) = 4 / 6
    torch.testing.assert_close(effective_sample_size(t([[1.0, 1.0, 0.0, 9.0]]), mask), t(2 / 3))


def test_running_moments_match_numpy_over_the_concatenated_batches():
    batches = [
        np.array([1.0, -1.0, 1.0]),
        np.array([0.5]),
        np.array([-1.0, -1.0, 1.0, 0.0, 1.0]),
        np.array([1.0, 1.0]),
    ]
    moments = RunningMoments()
    for batch in batches:
        moments.update(torch.from_numpy(batch))
    everything = np.concatenate(batches)
    assert moments.count == 11
    assert moments.mean == pytest.approx(everything.mean())
    assert moments.std == pytest.approx(everything.std(ddof=1))
    expected = np.clip((everything - everything.mean()) / everything.std(ddof=1), -1.5, 1.5)
    np.testing.assert_allclose(moments.normalize(torch.from_numpy(everything), clip=1.5).numpy(), expected)
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert (restored.mean, restored.std, restored.count) == (moments.mean, moments.std, moments.count)


def test_whitening_gives_mean_0_and_std_1_over_the_masked_entries():
    x = torch.randn(3, 7, dtype=D) * 4 + 2
    mask = (torch.arange(7) < t([[7], [4], [2]])).to(D)
    whitened = masked_whiten(x, mask)
    valid = whitened[mask.bool()].numpy()
    assert valid.mean() == pytest.approx(0.0, abs=1e-9)
    assert valid.std(ddof=1) == pytest.approx(1.0, abs=1e-6)
    assert (whitened[~mask.bool()] == 0).all()
    kept_mean = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(masked_mean(kept_mean, mask), masked_mean(x, mask))


def test_explained_variance_is_one_for_a_perfect_critic_and_zero_for_the_mean():
    returns = t([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    torch.testing.assert_close(explained_variance(returns, returns, mask), t(1.0))
    torch.testing.assert_close(explained_variance(torch.full_like(returns, 3.0), returns, mask), t(0.0))
    assert explained_variance(returns, torch.ones_like(returns), mask).isnan()


def test_logprobs_from_logits_match_tempered_log_softmax_per_row():
    logits = torch.randn(2, 5, 11, dtype=D)
    tokens = torch.randint(0, 11, (2, 5))
    temperature = t([0.7, 1.0])
    expected = torch.stack(
        [(logits[i] / temperature[i]).log_softmax(-1).gather(-1, tokens[i, :, None])[:, 0] for i in range(2)]
    )
    torch.testing.assert_close(logprobs_from_logits(logits, tokens, temperature), expected)
    bf16 = logprobs_from_logits(logits.bfloat16(), tokens, 0.7)
    assert bf16.dtype == torch.float32
    # computed in float32 from the bf16 values: float32's accuracy (its default tolerances), not bf16's
    exact = logprobs_from_logits(logits.bfloat16().double(), tokens, 0.7)
    torch.testing.assert_close(bf16, exact.float())


def test_entropy_from_logits_matches_the_categorical_entropy_across_chunks():
    logits = torch.randn(3, 4, 13, dtype=D)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=5), expected)
    uniform = entropy_from_logits(torch.zeros(1, 2, 8))
    torch.testing.assert_close(uniform, torch.full((1, 2), math.log(8)))


def test_exact_kl_sums_over_the_vocabulary_at_each_position():
    # position 0: p = (0.5, 0.5), q = (0.25, 0.75): 0.5 ln 2 + 0.5 ln(2/3) = 0.5 ln(4/3) = 0.143841
    # position 1: p = q, so 0
    log_p = t([[[0.5, 0.5], [0.9, 0.1]]]).log()
    log_q = t([[[0.25, 0.75], [0.9, 0.1]]]).log()
    torch.testing.assert_close(exact_kl(log_p, log_q), t([[0.5 * math.log(4 / 3), 0.0]]))
    # KL(q || p) = 0.25 ln(0.5) + 0.75 ln(1.5) = 0.130812: not symmetric
    torch.testing.assert_close(exact_kl(log_q, log_p)[0, 0], t(0.25 * math.log(0.5) + 0.75 * math.log(1.5)))


def test_minibatch_loss_adds_the_exact_kl_term_weighted_by_kl_coef():
    logprobs_new, logprobs_old = _policy_inputs()
    values = torch.zeros(1, 6, dtype=D)
    kl = t([[0.2, 0.4, 0.0, 0.6, 0.2, 9.0]])  # 9.0 sits on a masked position
    without, _ = ppo_minibatch_loss(
        logprobs_new, logprobs_old, ADV, values, values, values, PG_MASK, PPOConfig()
    )
    config = PPOConfig(kl_coef=0.5)
    loss, diagnostics = ppo_minibatch_loss(
        logprobs_new, logprobs_old, ADV, values, values, values, PG_MASK, config, kl_ref=kl
    )
    # mean over the 5 valid tokens: (0.2 + 0.4 + 0 + 0.6 + 0.2) / 5 = 0.28; loss grows by 0.5 * 0.28
    assert diagnostics["kl_loss"] == pytest.approx(0.28)
    torch.testing.assert_close(loss, without + 0.14)
    with pytest.raises(ValueError, match="exact_kl"):
        ppo_minibatch_loss(logprobs_new, logprobs_old, ADV, values, values, values, PG_MASK, config)


def test_minibatch_loss_combines_policy_value_and_entropy_terms():
    logprobs_new, logprobs_old = _policy_inputs()
    values_old, returns = torch.zeros(1, 6, dtype=D), torch.ones(1, 6, dtype=D)
    values_new = t([[0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])
    entropy = torch.full((1, 6), 2.0, dtype=D)
    config = PPOConfig(vf_coef=0.1, ent_coef=0.01)
    loss, diagnostics = ppo_minibatch_loss(
        logprobs_new, logprobs_old, ADV, values_new, values_old, returns, PG_MASK, config, entropy=entropy
    )
    # value loss: every token (0.1 - 1)^2 = 0.81, unclipped -> 0.5 * 0.81 = 0.405
    # total = -0.32 + 0.1 * 0.405 - 0.01 * 2 = -0.2995
    torch.testing.assert_close(loss, t(-0.2995))
    assert {name: v for name, v in diagnostics.items() if name != "kl_loss"} == pytest.approx(
        {
            "policy_loss": -0.32,
            "value_loss": 0.405,
            "entropy": 2.0,
            "approx_kl": diagnostics["approx_kl"],
            "clipfrac": 0.8,
        }
    )
    with pytest.raises(ValueError, match="entropy_from_logits"):
        ppo_minibatch_loss(logprobs_new, logprobs_old, ADV, values_new, values_old, returns, PG_MASK, config)
    _, no_entropy = ppo_minibatch_loss(
        logprobs_new, logprobs_old, ADV, values_new, values_old, returns, PG_MASK, PPOConfig(ent_coef=0.0)
    )
    assert math.isnan(no_entropy["entropy"])
    assert math.isnan(diagnostics["kl_loss"])  # kl_coef = 0: the term is not computed
