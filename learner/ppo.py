"""PPO for language models, as pure functions on tensors.

InstructGPT's PPO step (Ouyang et al. 2022), i.e. Ziegler et al. 2019 ("Fine-Tuning Language Models from
Human Preferences"): a scalar score R per response, a per-token KL penalty to the reference policy, GAE
(Schulman et al. 2016) and the clipped surrogate (Schulman et al. 2017). Answers were served by older
adapter versions, so the policy gradient carries IMPALA's truncated importance weights (Espeholt et al. 2018).

Policies: pi_theta is optimised; pi_old is pi_theta before this update; pi_b (behaviour) is the adapter
version that served the answer; pi_ref is the base model (adapter off). Per-token tensors are [B, T] over
the response tokens, right-padded, with a float ``mask`` [B, T]: 1 on response tokens, 0 on (finite,
e.g. 0) padding. Forward passes, batching, optimisers and checkpoints live in the learner loop, not here;
the hyper-parameters in learner/config.py (`PPOConfig`), the KL estimators in thumbtune/core/divergence.py
and the beta controllers in learner/kl.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from learner.config import PPOConfig
from thumbtune.core.divergence import kl_k1, kl_k3

KL_PENALTY_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}
"""The per-token estimates of KL(pi_old || pi_ref) the reward's penalty may use (`PPOConfig.kl_penalty`)."""


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * m) / sum(m) over all entries, or along ``dim``; 0 where the mask is empty."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the valid entries; ``unbiased`` divides by n - 1 (Bessel) instead of n."""
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1.0)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mean) / std over the valid entries; ``shift_mean=False`` only rescales. Padding becomes 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def last_token_mask(mask: Tensor) -> Tensor:
    """1 at the last valid token of each right-padded row, 0 elsewhere (all 0 for an empty row)."""
    next_mask = F.pad(mask[:, 1:], (0, 1))
    return mask * (1 - next_mask)


def token_rewards(
    score: Tensor,
    logprobs_old: Tensor,
    logprobs_ref: Tensor,
    mask: Tensor,
    beta: float,
    estimator: str = "k1",
) -> Tensor:
    """Per-token rewards of Ziegler et al. (eq. 2): a KL penalty at every token, the score at the end.

        r_t = -beta * k(a_t | s_t) + [t = last valid token] * R

    k estimates KL(pi_old || pi_ref) from the sampled token (thumbtune/core/divergence.py), with
    rho = pi_ref / pi_old:
    k1 = -log rho (Ziegler et al.; its sum over a response is `sequence_kl`, what `AdaptiveKLController`
    steers) or k3 = (rho - 1) - log rho (TRL's `kl_estimator="k3"`): the same expectation and never
    negative, but ~x^2 / 2 for a token the policy made e^x times likelier (k1: x), so it hardly holds back
    what the thumbs teach, and huge for sampled tokens the policy made rare. With SmolLM2 at beta 0.3 it
    let the policy break its answers within 400 ratings (run 7 in docs/BENCHMARKS.md); k1 is the default.
    ``score`` is R, shape [B], already normalised (`RunningMoments.normalize`). Padding gets 0.
    """
    if estimator not in KL_PENALTY_ESTIMATORS:
        raise ValueError(f"KL penalty estimator {estimator!r} is not one of {sorted(KL_PENALTY_ESTIMATORS)}")
    kl = KL_PENALTY_ESTIMATORS[estimator](logprobs_old, logprobs_ref) * mask
    return -beta * kl + score.unsqueeze(1) * last_token_mask(mask)


def sequence_kl(logprobs_old: Tensor, logprobs_ref: Tensor, mask: Tensor) -> Tensor:
    """sum_t (log pi_old - log pi_ref): the k1 estimate of KL(pi_old || pi_ref) per sequence, [B], in nats."""
    return ((logprobs_old - logprobs_ref) * mask).sum(1)


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over right-padded responses.

        delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last valid token = 0: terminal)
        A_t     = sum_l (gamma * lam)^l delta_{t+l} = delta_t + gamma * lam * A_{t+1}
        returns = A_t + V_t                             (the TD(lambda) target of the value head)

    Rewards and values are zeroed on padding first, so padding contributes no delta; this relies on the
    padding being on the right. Whiten the advantages over the whole batch afterwards (`masked_whiten`),
    as InstructGPT does, before splitting into minibatches.
    """
    rewards, values = rewards * mask, values * mask
    next_values = F.pad(values[:, 1:], (0, 1))
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros_like(deltas)
    lastgaelam = torch.zeros_like(deltas[:, 0])
    for t in reversed(range(deltas.shape[1])):
        lastgaelam = deltas[:, t] + gamma * lam * lastgaelam
        advantages[:, t] = lastgaelam
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


@torch.no_grad()
def truncated_importance_weights(
    logprobs_old: Tensor, logprobs_behaviour: Tensor, mask: Tensor, c: float = 1.0
) -> Tensor:
    """w_t = min(c, pi_old(a_t | s_t) / pi_b(a_t | s_t)), 0 on padding, no gradient.

    The events were sampled by older adapter versions pi_b, not by the pi_old being improved. The plain
    ratio pi_old / pi_b has unbounded variance; IMPALA's V-trace truncates it at rho-bar = c, trading a
    little bias for bounded variance. w = 1 on-policy (the adapter being trained served the answer) and
    shrinks as the policy moves away from what was served; where pi_old > pi_b the truncation keeps
    w = c = 1. Both log-probs are tempered with the request's T (contract.py), so w measures how far the
    adapter moved, not the request's sampling settings. Only the policy gradient is corrected (IMPALA's
    rho term); the GAE targets are not V-trace targets.
    """
    log_ratio = (logprobs_old - logprobs_behaviour) * mask
    return torch.exp(log_ratio).clamp(max=c) * mask


def effective_sample_size(weights: Tensor, mask: Tensor) -> Tensor:
    """Kish's effective sample size as a fraction of the n valid tokens, in (0, 1]:

    ESS = (sum_t w_t)^2 / (n * sum_t w_t^2)     (1 for equal weights, ~1/n when one token has them all)
    """
    w = weights * mask
    return w.sum() ** 2 / (mask.sum() * (w**2).sum()).clamp(min=torch.finfo(w.dtype).tiny)


def policy_loss(
    logprobs_new: Tensor,
    logprobs_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) as a loss, with optional importance weights.

        rho_t    = pi_theta(a_t | s_t) / pi_old(a_t | s_t)
        pg_loss1 = -A_t * rho_t
        pg_loss2 = -A_t * clip(rho_t, 1 - eps, 1 + eps)
        loss     = mean_t w_t * max(pg_loss1, pg_loss2)

    The max is the pessimistic bound: once the ratio has moved past 1 +- eps in the direction the
    advantage favours, the term is constant and its gradient is zero. Returns (loss, clipfrac, approx_kl):
    clipfrac is the fraction of tokens with |rho - 1| > eps, approx_kl the k3 estimate of
    KL(pi_old || pi_theta), mean((rho - 1) - log rho) (http://joschu.net/blog/kl-approx.html).
    """
    log_ratio = (logprobs_new - logprobs_old) * mask
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    pg_loss_max = torch.max(pg_loss1, pg_loss2)
    if is_weights is not None:
        pg_loss_max = is_weights * pg_loss_max
    loss = masked_mean(pg_loss_max, mask)
    with torch.no_grad():
        clipfrac = masked_mean(((ratio - 1).abs() > clip_eps).to(ratio.dtype), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, clipfrac, approx_kl


def value_loss(
    values_new: Tensor, values_old: Tensor, returns: Tensor, mask: Tensor, clip_eps: float
) -> Tensor:
    """Clipped value loss, as in the PPO baselines and InstructGPT; returns are the GAE targets R:

        v_loss_unclipped = (V - R)^2
        v_clipped        = V_old + clip(V - V_old, -eps, eps)
        v_loss_clipped   = (v_clipped - R)^2
        loss             = 0.5 * mean_t max(v_loss_unclipped, v_loss_clipped)

    The new value cannot profit from moving more than eps away from V_old in one update.
    """
    v_loss_unclipped = (values_new - returns) ** 2
    v_clipped = values_old + torch.clamp(values_new - values_old, -clip_eps, clip_eps)
    v_loss_clipped = (v_clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(v_loss_unclipped, v_loss_clipped), mask)


def _upcast(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    """Per-position entropy H_t = -sum_v pi(v | s_t) log pi(v | s_t), shape [...], from logits [..., V].

    Computed over chunks of ``chunk_size`` positions in float32, so without gradient only a chunk x V
    of temporaries exists at a time (a full softmax of a 150k vocabulary doubles the logits' memory).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    entropies = []
    for chunk in flat.split(chunk_size):
        logp = _upcast(chunk).log_softmax(-1)
        entropies.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(entropies).reshape(logits.shape[:-1])


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """log pi(a_t | s_t) = log_softmax(z_t / T)[a_t] = z_t[a_t] / T - logsumexp(z_t / T), shape [B, T].

    ``logits`` [B, T, V] are aligned with ``tokens`` [B, T] (the logits at t predict tokens[:, t]);
    ``temperature`` is a float or a [B] tensor, one T per row, since a batch mixes requests sampled at
    different temperatures (use `SamplingParams.logprob_temperature`). Gathering first and subtracting
    the logsumexp, row by row, never holds a [B, T, V] log-softmax; half-precision logits are upcast one
    row at a time, so ratios of these log-probs are not dominated by bf16 rounding.
    """
    if not isinstance(temperature, Tensor):
        temperature = torch.full((logits.shape[0],), float(temperature))
    rows = []
    for row_logits, row_tokens, temp in zip(logits, tokens, temperature.tolist(), strict=True):
        z = _upcast(row_logits)
        if temp != 1.0:
            z = z / temp
        rows.append(z.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1))
    return torch.stack(rows)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[R - V] / Var[R] over valid tokens: 1 is a perfect critic, 0 no better than a constant,
    negative is worse than a constant; nan when the returns have no variance."""
    var_returns = masked_var(returns, mask)
    explained = 1 - masked_var(returns - values, mask) / var_returns
    return torch.where(var_returns == 0, torch.full_like(explained, math.nan), explained)


class RunningMoments:
    """Running mean and std of every score seen, merged batch by batch (Chan et al.'s parallel Welford):

        delta = mean_b - mean,  n' = n + n_b,  mean' = mean + delta * n_b / n',
        M2' = M2 + M2_b + delta^2 * n * n_b / n'

    InstructGPT normalises its reward model so scores have mean 0. Our raw score is a thumb in [-1, 1] and
    batches are small (a batch of thumbs-up has no spread of its own), so we centre by the running mean (a
    baseline: good relative to the usual answer) and scale by the running std, across batches rather than
    per batch, then clip to +-reward_clip. Call `update` on a batch before `normalize` on it.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.m2 = 0.0
        self.count = 0

    def update(self, x: Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        batch_mean = x.mean().item()
        batch_m2 = ((x - batch_mean) ** 2).sum().item()
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        """Sample standard deviation (n - 1 in the denominator); 1 until two values have been seen."""
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def normalize(self, x: Tensor, clip: float | None = None) -> Tensor:
        """(x - mean) / std with the running statistics, clipped to [-clip, clip] when ``clip`` is given."""
        normalized = (x - self.mean) / (self.std + 1e-8)
        return normalized if clip is None else normalized.clamp(-clip, clip)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "m2": self.m2, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.m2, self.count = float(state["mean"]), float(state["m2"]), int(state["count"])


def ppo_minibatch_loss(
    logprobs_new: Tensor,
    logprobs_old: Tensor,
    advantages: Tensor,
    values_new: Tensor,
    values_old: Tensor,
    returns: Tensor,
    mask: Tensor,
    config: PPOConfig,
    is_weights: Tensor | None = None,
    entropy: Tensor | None = None,
    kl_ref: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """loss = pg_loss + c_v * v_loss - c_e * entropy + c_kl * kl_loss  (Schulman et al. 2017, eq. 9,
    negated to be minimised; the last term as in GRPO, Shao et al. 2024, with the exact per-token KL).

    ``entropy`` is the per-token `entropy_from_logits` of pi_theta, needed only when ent_coef > 0 (else
    reported as nan); ``kl_ref`` the per-token `exact_kl` of pi_theta to pi_ref, needed only when
    kl_coef > 0. kl_loss = mean_t KL_t. The reward's -beta * k1 penalty reaches the policy only through
    the noisy policy-gradient estimate; this term is the same divergence's direct gradient at the visited
    states. Returns the loss and diagnostics: policy_loss, value_loss, entropy, kl_loss, approx_kl, clipfrac.
    """
    pg_loss, clipfrac, approx_kl = policy_loss(
        logprobs_new, logprobs_old, advantages, mask, config.clip_eps, is_weights
    )
    v_loss = value_loss(values_new, values_old, returns, mask, config.value_clip_eps)
    if entropy is None and config.ent_coef != 0:
        raise ValueError(
            f"ent_coef={config.ent_coef} needs the per-token entropy: pass entropy=entropy_from_logits(...)"
        )
    loss = pg_loss + config.vf_coef * v_loss
    if kl_ref is None and config.kl_coef != 0:
        raise ValueError(f"kl_coef={config.kl_coef} needs the per-token KL: pass kl_ref=exact_kl(...)")
    if kl_ref is None:
        kl_loss = torch.full_like(pg_loss, math.nan)
    else:
        kl_loss = masked_mean(kl_ref, mask)
        loss = loss + config.kl_coef * kl_loss
    if entropy is None:
        entropy_loss = torch.full_like(pg_loss, math.nan)
    else:
        entropy_loss = masked_mean(entropy, mask)
        loss = loss - config.ent_coef * entropy_loss
    diagnostics = {"policy_loss": pg_loss, "value_loss": v_loss, "entropy": entropy_loss, "kl_loss": kl_loss}
    diagnostics |= {"approx_kl": approx_kl, "clipfrac": clipfrac}
    return loss, {name: value.item() for name, value in diagnostics.items()}
