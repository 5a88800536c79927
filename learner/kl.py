"""KL(pi || pi_ref): the estimators, the exact divergence, and the controllers of its coefficient beta.

The reward's per-token penalty uses the k1 (or, by `PPOConfig.kl_penalty`, the k3) estimate at the sampled
token (`learner.ppo.token_rewards`);
the diagnostics report k3; the optional loss term (`PPOConfig.kl_coef`) uses `exact_kl` over the whole
vocabulary. beta itself is steered by `AdaptiveKLController` (Ziegler et al. 2019) or held fixed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def exact_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) at each position, summed over the whole vocabulary: sum_v p_v (log p_v - log q_v), [...].

    ``log_p`` and ``log_q`` are log-distributions [..., V]. Unlike k1-k3 this is no estimate from the
    sampled token: at a visited state it is the divergence itself, and its gradient pulls every
    token's probability back toward the reference, not only the one that was sampled.
    """
    return (log_p.exp() * (log_p - log_q)).sum(-1)


# KL(p || q) estimated from samples x ~ p with r = log q(x) - log p(x): http://joschu.net/blog/kl-approx.html
def kl_k1(logp: Tensor, logq: Tensor) -> Tensor:
    """k1 = -r: unbiased for KL(p || q), high variance, can be negative (http://joschu.net/blog/kl-approx.html)."""
    return logp - logq


def kl_k2(logp: Tensor, logq: Tensor) -> Tensor:
    """k2 = r^2 / 2: biased for KL(p || q), low variance, >= 0 (http://joschu.net/blog/kl-approx.html)."""
    return 0.5 * (logq - logp) ** 2


def kl_k3(logp: Tensor, logq: Tensor) -> Tensor:
    """k3 = (e^r - 1) - r: unbiased for KL(p || q), low variance, >= 0 (http://joschu.net/blog/kl-approx.html)."""
    log_ratio = logq - logp
    return torch.expm1(log_ratio) - log_ratio


class AdaptiveKLController:
    """Log-space proportional controller for beta (Ziegler et al. 2019, section 2.2; TRL's form):

        e_t        = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_{t+1} = beta_t * (1 + e_t * n_steps / horizon)

    KL_t is the batch mean of `sequence_kl` (nats per sequence) and n_steps the number of sequences in
    the batch, so beta changes by at most ~20% per ``horizon`` sequences. Ziegler's K_beta is
    n_steps / horizon here.
    """

    def __init__(self, init_beta: float, target: float, horizon: int) -> None:
        self.value = init_beta
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """Constant beta with AdaptiveKLController's interface. Its value is the configuration's, so
    `load_state_dict` leaves it alone: changing init_beta and resuming takes effect."""

    def __init__(self, value: float) -> None:
        self.value = value

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        pass
