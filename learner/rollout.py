"""Rollouts: the learner's own answers to prompts users sent, scored by the reward model.

With ``signal`` 'reward_model' or 'both' (learner/config.py), every update also trains on answers the
policy samples itself (InstructGPT's PPO stage; on-policy, so pi_b = pi_theta and the importance weight
is 1), scored by the reward model fitted on every human rating so far (learner/reward_model.py):

    x_1 .. x_P          distinct prompts users sent, drawn from the newest ones (`PromptPool`)
    y_i1 .. y_iG        ~ pi_theta(. | x_i) at temperature T                        (`sample_with_logprobs`)
    s_ij = 2 sigma(mean_ij - kappa * spread_ij) - 1                                 (`pessimistic_reward`)
    R_ij = s_ij - 1/(G - 1) sum_{k != j} s_ik                                       (`leave_one_out`)

s is in a thumb's units: the pointwise heads are logistic, sigma(r) = P(up), and 2 P(up) - 1 is the
expected thumb (+1 up, -1 down), so human rewards and these mix in one batch. mean - kappa * spread is
pessimistic where the ensemble's heads disagree (the answers the ratings say least about), so the policy
does not chase the reward model's errors (Gao et al. 2022 on over-optimising a learnt reward). The
leave-one-out baseline (RLOO; Kool et al. 2019, Ahmadian et al. 2024) removes how easy the prompt is:
only how an answer compares with the policy's other answers to the same prompt remains.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import torch
from torch import Tensor

from learner.policy import Policy, Sample
from learner.reward_model import Ensemble
from thumbtune.core.contract import FeedbackEvent


class PromptPool:
    """The newest ``capacity`` distinct prompts (token ids) users sent, oldest first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._prompts: OrderedDict[tuple[int, ...], None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._prompts)

    def add(self, events: list[FeedbackEvent]) -> None:
        for event in events:
            key = tuple(event.prompt_token_ids)
            self._prompts.pop(key, None)
            self._prompts[key] = None  # a prompt sent again counts as new
        while len(self._prompts) > self.capacity:
            self._prompts.popitem(last=False)

    def draw(self, k: int, generator: torch.Generator) -> list[list[int]]:
        """``k`` distinct prompts (all of them when fewer), uniformly from the pool."""
        prompts = list(self._prompts)
        order = torch.randperm(len(prompts), generator=generator)[:k].tolist()
        return [list(prompts[i]) for i in order]

    def state_dict(self) -> list[list[int]]:
        return [list(p) for p in self._prompts]

    def load_state_dict(self, state: list[list[int]]) -> None:
        self._prompts = OrderedDict((tuple(p), None) for p in state[-self.capacity :])


@torch.no_grad()
def sample_with_logprobs(
    model,  # noqa: ANN001 - any HF causal LM (a peft model samples with its active adapter)
    prompts: list[list[int]],
    *,
    pad: int,
    eos: list[int],
    max_tokens: int,
    temperature: float = 1.0,
) -> list[tuple[list[int], list[float]]]:
    """One batched ``generate`` (left padding, no top-k/top-p) with torch's current seed: each answer cut
    after its first end token (which stays in, as the server records it), with log_softmax(z_t / T)[a_t]
    per token of the raw logits (what the server records at temperature T)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=attention.to(device),
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_tokens,
        pad_token_id=pad,
        eos_token_id=eos,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[:, width:]
    logits = torch.stack(out.logits, dim=1).float() / temperature
    logp = logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    answers = []
    for row, lps in zip(tokens.tolist(), logp.tolist(), strict=True):
        n = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        answers.append((row[:n], [min(x, 0.0) for x in lps[:n]]))
    return answers


def pessimistic_reward(ensemble: Ensemble, features: Tensor, kappa: float) -> tuple[Tensor, Tensor]:
    """(s, spread) per answer, each [N]: s = 2 sigma(mean - kappa * spread) - 1 of the heads' scores."""
    score, spread = ensemble.score(features, kappa)
    return 2 * torch.sigmoid(score) - 1, spread


def leave_one_out(rewards: Tensor) -> Tensor:
    """R_ij = s_ij - mean_{k != j} s_ik over the answers j of each prompt i: rewards [P, G] -> [P, G]."""
    group = rewards.shape[1]
    others = (rewards.sum(1, keepdim=True) - rewards) / (group - 1)
    return rewards - others


def rollouts(
    policy: Policy,
    prompts: list[list[int]],
    *,
    samples: int,
    max_tokens: int,
    temperature: float,
    pad: int,
    eos: list[int],
    seed: int,
    name: str,
) -> list[Sample]:
    """``samples`` answers of the policy (adapter on) to each prompt, grouped by prompt, rewards unset (0).
    Sampled under torch's RNG seeded with ``seed`` (the learner's own stream), then restored."""
    rows = [p for p in prompts for _ in range(samples)]
    with torch.random.fork_rng(devices=[policy.device] if policy.device.type == "cuda" else []):
        torch.manual_seed(seed)
        with policy._autocast():
            answers = sample_with_logprobs(
                policy.model, rows, pad=pad, eos=eos, max_tokens=max_tokens, temperature=temperature
            )
    return [
        Sample(f"{name}-{i}", prompt, response, logprobs, temperature, 0.0)
        for i, (prompt, (response, logprobs)) in enumerate(zip(rows, answers, strict=True))
    ]


def scored(rollout: list[Sample], rewards: Tensor, samples: int) -> list[Sample]:
    """The rollout with R = `leave_one_out` of ``rewards`` (s per answer, [P * G] in rollout order)."""
    centred = leave_one_out(rewards.reshape(-1, samples)).reshape(-1).tolist()
    return [replace(s, reward=r, centred=True) for s, r in zip(rollout, centred, strict=True)]
