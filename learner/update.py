"""One PPO update on one batch of rated answers: the orchestration around the math in learner/ppo.py.

    1. no grad, at the start:  log pi_old, V_old, H(pi_old), tempered log pi_old  (adapter on)
                               log pi_ref                                          (adapter off)
    2. R~ = clip((R - mean) / std)  with running statistics of every human reward seen (not per batch);
                                    a rollout's R already has its baseline (learner/rollout.py): R / std
                                    with the std of this update's rollout rewards
    3. r_t = -beta * k(pi_old, pi_ref) + [t = last] * R~      (k = k1 or k3, PPOConfig.kl_penalty)
    4. A, returns = GAE(r, V_old; gamma = 1, lambda);  A whitened over the batch
    5. w_t = min(c, pi_old(a_t) / pi_b(a_t))   (truncated importance weight, both at the event's T)
                                    times u_i, the answer's rater weight (learner/raters.py; 1 for rollouts)
    6. K epochs x minibatches of  loss = w * clipped surrogate + c_v * clipped value loss - c_e * H
                                  + c_kl * exact KL(pi_theta || pi_ref) per token (off unless c_kl > 0)
                                  - gamma * mean_t log pi_theta(x_t) on pretraining text (learner/ptx.py),
       AdamW over the LoRA weights + value head, gradient-norm clipping; stop early once the epoch's
       approx-KL(pi_old || pi_theta) passes the threshold
    7. beta <- KL controller(mean over responses of sum_t (log pi_old - log pi_ref))

pi_old is this update's starting policy, recomputed here, not the log-probs the server recorded:
the served answer may come from an older version, and that gap is what w corrects.

Memory: on CPU no forward pass holds more than `CPU_FORWARD_TOKENS` padded tokens. The no-grad passes of
step 1 run over row chunks; a minibatch over the budget runs as micro-batches whose losses are weighted
by their share of the minibatch's response tokens, so their gradients add up to the minibatch's (every
loss term is a token mean) and the optimizer still steps once per minibatch. Only memory changes: the
activations autograd keeps (~1.2 GB per 1,000 tokens for SmolLM2-135M in float32) stay bounded
whatever the answers' lengths, and freed activations are reused instead of growing the heap.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from learner.average import WeightAverage, lora_parameters, trained_weights
from learner.config import PPOConfig
from learner.distributed import SINGLE, DataParallel
from learner.kl import AdaptiveKLController, FixedKLController, kl_controller
from learner.policy import Batch, Policy, PolicyOutput
from learner.ppo import (
    RunningMoments,
    effective_sample_size,
    explained_variance,
    gae,
    masked_mean,
    masked_whiten,
    ppo_minibatch_loss,
    sequence_kl,
    token_rewards,
    truncated_importance_weights,
)
from learner.ptx import PretrainingMix
from learner.raters import RaterWindow
from learner.reward_model import RewardModel
from learner.rollout import PromptPool
from thumbtune.core.divergence import exact_kl, kl_k3

log = logging.getLogger(__name__)

GAMMA = 1.0
"""No discount over a response's tokens: its one score arrives at the end."""


@dataclass
class LearnerState:
    """Everything besides the weights that a resumed learner needs to continue where it stopped."""

    optimizer: torch.optim.Optimizer
    kl_controller: AdaptiveKLController | FixedKLController
    reward_moments: RunningMoments = field(default_factory=RunningMoments)
    length_moments: RunningMoments = field(default_factory=RunningMoments)
    """Response lengths of every batch trained on, for the length-drift diagnostic."""
    generator: torch.Generator = field(default_factory=torch.Generator)
    """Minibatch shuffling."""
    updates: int = 0
    average: WeightAverage | None = None
    """The published Polyak average of the LoRA weights (learner/average.py); None: publish theta."""
    reward_model: RewardModel | None = None
    """The reward model fitted on every human rating so far (learner/reward_model.py); None: none."""
    prompts: PromptPool = field(default_factory=lambda: PromptPool(256))
    """The newest distinct prompts users sent, which the learner answers itself (learner/rollout.py)."""
    raters: RaterWindow = field(default_factory=lambda: RaterWindow(512))
    """Who rated the newest human ratings, for the rater caps over a window (learner/raters.py)."""

    @classmethod
    def create(cls, policy: Policy, cfg: PPOConfig, seed: int = 0) -> LearnerState:
        """A fresh state; with ``cfg.average_decay`` > 0 the average starts at the policy's weights."""
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        generator = torch.Generator()
        generator.manual_seed(seed)
        decay = cfg.average_decay
        average = WeightAverage(lora_parameters(policy.model), decay) if decay > 0 else None
        return cls(optimizer, kl_controller(cfg), generator=generator, average=average)

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "kl_controller": self.kl_controller.state_dict(),
            "reward_moments": self.reward_moments.state_dict(),
            "length_moments": self.length_moments.state_dict(),
            "generator": self.generator.get_state(),
            "updates": self.updates,
            # theta, when the adapter file holds the average w instead (see learner/average.py)
            **({"trained_weights": trained_weights(self.average.params)} if self.average else {}),
            **({"reward_model": self.reward_model.state_dict()} if self.reward_model else {}),
            "prompts": self.prompts.state_dict(),
            "raters": self.raters.state_dict(),
        }

    def shared(self) -> dict:
        """What `ppo_update` reads of the state besides the weights and the optimizer, which the other ranks
        keep in step by training alike (learner/distributed.py): sent to them before each update, since
        rank 0 alone also draws from the generator (rollouts) and may restore an older version."""
        return {
            "kl_controller": self.kl_controller.state_dict(),
            "reward_moments": self.reward_moments.state_dict(),
            "length_moments": self.length_moments.state_dict(),
            "generator": self.generator.get_state(),
            "updates": self.updates,
        }

    def load_shared(self, shared: dict) -> None:
        """Take rank 0's `shared` state."""
        self.kl_controller.load_state_dict(shared["kl_controller"])
        self.reward_moments.load_state_dict(shared["reward_moments"])
        self.length_moments.load_state_dict(shared["length_moments"])
        self.generator.set_state(shared["generator"])
        self.updates = int(shared["updates"])

    def load_state_dict(self, state: dict) -> None:
        """Restore; the learning rate stays the configured one, so a changed THUMBTUNE_LEARNER_LR applies."""
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.reward_moments.load_state_dict(state["reward_moments"])
        self.length_moments.load_state_dict(state["length_moments"])
        self.generator.set_state(state["generator"])
        self.updates = int(state["updates"])
        model = state.get("reward_model")
        if self.reward_model is not None and model is not None:
            if model["features"].shape[-1] == self.reward_model.ensemble.dim:
                self.reward_model.load_state_dict(model)
            else:  # fitted on another phi (learner/policy.py `features` changed): relearnt from new ratings
                log.warning(
                    "the stored reward model was fitted on %d features, today's phi has %d: starting it "
                    "afresh (the signal stays direct until it has earned trust again)",
                    model["features"].shape[-1],
                    self.reward_model.ensemble.dim,
                )
        self.prompts.load_state_dict(state.get("prompts", []))
        self.raters.load_state_dict(state.get("raters", []))


CPU_FORWARD_TOKENS = 1024
"""Most padded tokens (rows x columns) one forward pass holds on CPU; CUDA runs whole (mini)batches."""


def row_chunks(batch: Batch, index: Tensor, max_tokens: int | None) -> list[Tensor]:
    """``index`` split into the fewest near-equal row chunks of at most ``max_tokens`` padded tokens each
    (a single row may exceed it); None: one chunk."""
    if max_tokens is None:
        return [index]
    width = int(batch.attention_mask[index].sum(1).max())
    return list(index.tensor_split(min(len(index), math.ceil(len(index) * width / max_tokens))))


def forward_chunked(
    policy: Policy, batch: Batch, max_tokens: int | None, rows: Tensor | None = None, **kwargs: bool
) -> PolicyOutput:
    """`Policy.forward_batch` over row chunks of ``rows`` (all by default), each output right-padded back to
    the batch's T with zeros (what the masked outputs hold on padding anyway)."""
    rows = torch.arange(len(batch), device=policy.device) if rows is None else rows.to(policy.device)
    chunks = [
        policy.forward_batch(batch.subset(index), **kwargs) for index in row_chunks(batch, rows, max_tokens)
    ]
    width = batch.mask.shape[1]

    def joined(parts: list[Tensor | None]) -> Tensor | None:
        if parts[0] is None:
            return None

        def padded(part: Tensor) -> Tensor:  # the T axis is dim 1: [B, T] or [B, T, V]
            return torch.nn.functional.pad(part, (0, 0) * (part.dim() - 2) + (0, width - part.shape[1]))

        return torch.cat([padded(part) for part in parts])

    return PolicyOutput(*(joined(list(parts)) for parts in zip(*chunks, strict=True)))


def forward_shared(
    policy: Policy, batch: Batch, max_tokens: int | None, dp: DataParallel, **kwargs: bool
) -> PolicyOutput:
    """`forward_chunked` of the whole batch on every rank, each rank computing its slice of the rows
    (learner/distributed.py); one process, or fewer rows than ranks: computed whole."""
    if dp.world == 1 or len(batch) < dp.world:
        return forward_chunked(policy, batch, max_tokens, **kwargs)
    index = torch.arange(len(batch))
    sizes = [len(rows) for rows in index.tensor_split(dp.world)]
    out = forward_chunked(policy, batch, max_tokens, rows=dp.rows(index), **kwargs)
    return PolicyOutput(*(None if part is None else dp.gather_rows(part, sizes) for part in out))


def importance_weights(policy: Policy, batch: Batch, c: float) -> Tensor:
    """w_t = min(c, pi(a_t) / pi_b(a_t)) of the policy's current weights on a batch, [B, T], no gradient."""
    with torch.no_grad():
        out = policy.forward_batch(batch, with_values=False, tempered=True)
    batch = batch.to(policy.device)
    return truncated_importance_weights(out.tempered_logprobs, batch.behaviour_logprobs, batch.mask, c)


def normalised_scores(batch: Batch, state: LearnerState, cfg: PPOConfig) -> Tensor:
    """Step 2: human rewards centred and scaled by the running moments (updated with them first); rows whose
    reward is already centred (rollouts) scaled by their own std in this batch, so that one of them weighs
    as much as a human rating (a reward model's differences between similar answers are small: at the
    human std they were drowned by the KL penalty, and the policy did not learn); all clipped to
    +-reward_clip."""
    scores = batch.scores.float()
    human = ~batch.centred
    if human.any():
        state.reward_moments.update(batch.scores[human])
    own = scores[batch.centred]
    own_std = own.std().item() if len(own) > 1 else 1.0
    scaled = (scores / max(own_std, 1e-6)).clamp(-cfg.reward_clip, cfg.reward_clip)
    return torch.where(batch.centred, scaled, state.reward_moments.normalize(scores, cfg.reward_clip))


def ppo_update(
    policy: Policy,
    batch: Batch,
    state: LearnerState,
    cfg: PPOConfig,
    ptx: PretrainingMix | None = None,
    dp: DataParallel = SINGLE,
) -> dict[str, float]:
    """Train ``policy`` on ``batch`` in place (steps 1-7 above) and return the update's diagnostics; with
    ``ptx`` and ``cfg.ptx_coef`` > 0 every minibatch adds the pretraining-mix term. Under data parallelism
    (``dp``, learner/distributed.py) every rank calls it on the same batch and state, and computes its share
    of the rows."""
    started = time.perf_counter()
    batch = batch.to(policy.device)
    mask = batch.mask
    max_tokens = CPU_FORWARD_TOKENS if policy.device.type == "cpu" else None

    # 1. the starting policy, the reference, the critic
    with torch.no_grad():
        old = forward_shared(
            policy, batch, max_tokens, dp, with_values=True, with_entropy=True, tempered=True
        )
        ref = forward_shared(
            policy, batch, max_tokens, dp, with_values=False, reference=True, with_log_dist=cfg.kl_coef > 0
        )
    old_logprobs, old_values = old.logprobs, old.values

    # 2-5. rewards, advantages, importance weights
    beta = state.kl_controller.value
    scores = normalised_scores(batch, state, cfg)
    rewards = token_rewards(scores, old_logprobs, ref.logprobs, mask, beta, cfg.kl_penalty)
    advantages, returns = gae(rewards, old_values, mask, GAMMA, cfg.lam)
    advantages = masked_whiten(advantages, mask)
    is_weights = truncated_importance_weights(
        old.tempered_logprobs, batch.behaviour_logprobs, mask, cfg.is_clip_c
    )

    # 6. epochs x minibatches
    params = policy.parameters()
    names = ("policy_loss", "value_loss", "approx_kl", "clipfrac", *(("kl_loss",) if cfg.kl_coef > 0 else ()))
    stats: dict[str, list[float]] = defaultdict(list)
    epochs_run, early_stopped = 0, False
    for _ in range(cfg.epochs):
        epoch_kl = []
        for index in torch.randperm(len(batch), generator=state.generator).split(cfg.minibatch_size):
            index = index.to(policy.device)
            state.optimizer.zero_grad(set_to_none=True)
            tokens = mask[index].sum().item()
            minibatch = dict.fromkeys(names, 0.0)
            mine = dp.rows(index)  # all of it in one process
            for part in row_chunks(batch, mine, max_tokens) if len(mine) else []:  # one unless over budget
                mb = batch.subset(part)
                cols = slice(0, mb.mask.shape[1])
                new = policy.forward_batch(
                    mb, with_values=True, with_entropy=cfg.ent_coef > 0, with_log_dist=cfg.kl_coef > 0
                )
                kl_to_ref = None if new.log_dist is None else exact_kl(new.log_dist, ref.log_dist[part, cols])
                loss, diag = ppo_minibatch_loss(
                    new.logprobs,
                    old_logprobs[part, cols],
                    advantages[part, cols],
                    new.values,
                    old_values[part, cols],
                    returns[part, cols],
                    mb.mask,
                    cfg,
                    is_weights=is_weights[part, cols] * mb.weights[:, None],
                    entropy=new.entropy,
                    kl_ref=kl_to_ref,
                )
                share = mb.mask.sum().item() / max(tokens, 1.0)  # token means: shares add up to 1 exactly
                (loss * share).backward()
                for name in names:
                    minibatch[name] += share * diag[name]
            if ptx is not None and cfg.ptx_coef > 0:
                minibatch["ptx_nll"] = pretraining_mix_step(policy, ptx, state, cfg, dp)
            minibatch = dp.sum_floats(minibatch)  # the ranks' shares add up to the minibatch's figures
            dp.sum_gradients(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            state.optimizer.step()
            for name, value in minibatch.items():
                stats[name].append(value)
            stats["grad_norm"].append(float(grad_norm))
            epoch_kl.append(minibatch["approx_kl"])
        epochs_run += 1
        if cfg.early_stop_kl is not None and sum(epoch_kl) / len(epoch_kl) > cfg.early_stop_kl:
            early_stopped = True
            break

    # 7. the KL controller sees the starting policy's KL to the reference, per response
    kl_ref = sequence_kl(old_logprobs, ref.logprobs, mask).mean().item()
    state.kl_controller.update(kl_ref, len(batch))
    state.updates += 1

    lengths = mask.sum(1)
    previous_mean_length = state.length_moments.mean if state.length_moments.count else lengths.mean().item()
    state.length_moments.update(lengths)
    elapsed = time.perf_counter() - started
    diagnostics = {name: sum(values) / len(values) for name, values in stats.items()}
    diagnostics |= {
        "entropy": masked_mean(old.entropy, mask).item(),
        "kl_ref": kl_ref,
        "kl_ref_k3_per_token": masked_mean(kl_k3(old_logprobs, ref.logprobs), mask).item(),
        "beta": beta,
        "beta_next": state.kl_controller.value,
        "explained_variance": explained_variance(old_values, returns, mask).item(),
        "mean_reward": human_mean(batch),
        "mean_normalized_reward": scores.mean().item(),
        "is_weight_mean": masked_mean(is_weights, mask).item(),
        "is_ess": effective_sample_size(is_weights, mask).item(),
        "response_length": lengths.float().mean().item(),
        "response_length_drift": lengths.float().mean().item() - previous_mean_length,
        "n_events": float(len(batch)),
        "n_tokens": mask.sum().item(),
        "epochs": float(epochs_run),
        "early_stopped": float(early_stopped),
        "update_s": elapsed,
        "tokens_per_s": mask.sum().item() * epochs_run / elapsed,
    }
    return {name: float(value) for name, value in diagnostics.items()}


def pretraining_mix_step(
    policy: Policy, ptx: PretrainingMix, state: LearnerState, cfg: PPOConfig, dp: DataParallel = SINGLE
) -> float:
    """Backpropagate L_ptx = -gamma * mean_t log pi_theta(x_t | x_<t) on ``ptx_batch`` passages
    (learner/ptx.py) into the minibatch's gradient; returns the passages' mean NLL per token. Under data
    parallelism each rank takes its slice of the passages, at its share of their tokens (the ranks' returns
    add up to the mean)."""
    passages = ptx.batch(cfg.ptx_batch, state.generator)  # the same passages on every rank
    mine = dp.rows(torch.arange(len(passages)))
    if not len(mine):
        return 0.0
    part = passages.subset(mine) if dp.world > 1 else passages
    share = part.mask.sum().item() / passages.mask.sum().item()
    out = policy.forward_batch(part, with_values=False)
    nll = -masked_mean(out.logprobs, part.mask.to(policy.device))
    (cfg.ptx_coef * share * nll).backward()
    return share * nll.item()


def human_mean(batch: Batch) -> float:
    """The mean reward of the batch's human-rated rows (nan when it has none)."""
    scores = batch.scores.float()[~batch.centred]
    return scores.mean().item() if len(scores) else math.nan


def finite(diagnostics: dict[str, float]) -> dict[str, float]:
    """The entries JSON can carry (explained variance is nan when every return is equal)."""
    return {name: value for name, value in diagnostics.items() if math.isfinite(value)}
