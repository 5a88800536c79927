"""The controllers of beta, the coefficient of the reward's KL(pi || pi_ref) penalty.

The reward's per-token penalty uses the k1 (or, by `PPOConfig.kl_penalty`, the k3) estimate at the sampled
token (`learner.ppo.token_rewards`); the diagnostics report k3; the optional loss term (`PPOConfig.kl_coef`)
uses the exact KL over the whole vocabulary. The estimators and the exact divergence are in
thumbtune/core/divergence.py (the server's KL probe uses them too). beta itself is steered by
`AdaptiveKLController` (Ziegler et al. 2019) or held fixed (`PPOConfig.fixed_beta`): `kl_controller`.
"""

from __future__ import annotations

from learner.config import PPOConfig


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


def kl_controller(cfg: PPOConfig) -> AdaptiveKLController | FixedKLController:
    """beta held at ``fixed_beta``, or steered from ``init_beta`` toward ``target_kl``."""
    if cfg.fixed_beta is not None:
        return FixedKLController(cfg.fixed_beta)
    return AdaptiveKLController(cfg.init_beta, cfg.target_kl, cfg.kl_horizon)
