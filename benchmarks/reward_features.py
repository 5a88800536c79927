"""`thumbtune bench reward-features`: which hidden states the reward model should read (issue 13).

The reward model is a linear ensemble on phi(x, y), features of the frozen base (learner/policy.py
`features`, learner/reward_model.py). How well a linear head can tell approved answers from the rest
depends on which states phi takes. This measures it without the loop: the base's own answers to training
prompts, labelled by a rule, fed to the product's `RewardModel` batch by batch as the learner feeds it,
each batch scored before the model trains on it (prequential, as the learner's reward_model.* figures).

    x_1 .. x_P    training prompts (bench loop's users' set), drawn with replacement
    y_i1 .. y_iG  ~ pi_base(. | x_i), G = rollout_samples, T = rollout_temperature, <= rollout_max_tokens
    label_ij      the rule's thumb (1 up, 0 down)
    phi variants  layer (the final, normalised states, or the middle layer L // 2) x with or without the
                  prompt blocks [xbar ; hbar * xbar]

Per rule and variant: AUC of the prequential scores over every answer after the first batch (how well the
model ranks answers it has not seen, the quantity the policy's advantages use), accuracy by sign, balanced
accuracy (the mean of the two classes' accuracies: a model that says "down" to everything scores 0.5 here
but 1 - base rate on accuracy) and log-loss. The answers and the scores are the same for every variant.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import machine
from learner.config import LearnerSettings
from learner.policy import Batch, Policy, features, resolve_device, resolve_precision
from learner.reward_model import Rated, RewardModel, auc
from learner.rollout import rollouts
from thumbtune.cli import rules
from thumbtune.cli.simulate import load_prompts
from thumbtune.core.base_model import load_base
from thumbtune.core.chat import encode_chat, end_token_ids, user_turn
from thumbtune.core.contract import FeedbackKind
from thumbtune.core.settings import Settings

VARIANTS: dict[str, tuple[int | None, bool]] = {
    "final [h_T; hbar]": (-1, False),
    "final + prompt": (-1, True),
    "middle [h_T; hbar]": (None, False),
    "middle + prompt": (None, True),
}
"""name -> (layer, prompt) of `features`; 'final [h_T; hbar]' was phi up to run 20, 'middle + prompt' is
today's."""


def classify(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """AUC, accuracy by sign, balanced accuracy and log-loss of scores r against 0/1 labels."""
    up, down = labels > 0.5, labels <= 0.5
    said_up = scores > 0
    recall_up = float(said_up[up].double().mean()) if up.any() else math.nan
    recall_down = float((~said_up[down]).double().mean()) if down.any() else math.nan
    return {
        "auc": auc(scores, labels),
        "accuracy": float((said_up == up).double().mean()),
        "balanced_accuracy": (recall_up + recall_down) / 2,
        "log_loss": float(F.binary_cross_entropy_with_logits(scores, labels)),
    }


def prequential_scores(
    phi: torch.Tensor, labels: torch.Tensor, batch: int, learner: LearnerSettings
) -> tuple[torch.Tensor, float]:
    """Feed (phi, label) to a fresh product `RewardModel` ``batch`` answers at a time, scoring each batch
    before it trains on it; the scores of every batch after the first, and the seconds the fits took."""
    model = RewardModel(
        learner.reward_model_heads,
        phi.shape[1],
        capacity=learner.reward_model_capacity,
        l2=learner.reward_model_l2,
        seed=learner.seed,
        window=learner.reward_model_window,
    )
    scores, fit_s = [], 0.0
    for start in range(0, len(phi), batch):
        rows = range(start, min(start + batch, len(phi)))
        if start:
            scores.append(model.score(phi[start : rows.stop])[0])
        rated = [Rated(f"a{i}", FeedbackKind.thumb, "up" if labels[i] > 0.5 else "down") for i in rows]
        began = time.perf_counter()
        model.observe(rated, phi[start : rows.stop])
        fit_s += time.perf_counter() - began
    return torch.cat(scores), fit_s


def run(
    settings: Settings,
    *,
    rules_: list[str] | None = None,
    answers: int = 512,
    batch: int = 32,
    seed: int = 0,
    learner: LearnerSettings | None = None,
    out: Path | None = None,
) -> dict:
    """``answers`` base answers, labelled by each rule, scored prequentially under every phi variant."""
    rules_ = rules_ or ["concise", "on-topic"]
    ls = learner or LearnerSettings()
    group = ls.rollout_samples
    if answers < 2 * batch or batch < 1 or answers % group:
        raise ValueError(
            f"--answers must be a multiple of {group} (rollout_samples) and at least 2 batches; got "
            f"--answers {answers} --batch {batch}"
        )
    judges = {name: rules.load_rule(name) for name in rules_}
    base = load_base(settings)
    tok = base.tokenizer
    device = resolve_device(ls.device)
    policy = Policy.fresh(  # the empty adapter: its answers and its adapter-off features are the base's
        base.model, settings, device, seed=ls.seed, autocast_dtype=resolve_precision(ls.precision, device)
    )
    eos = end_token_ids(policy.model, tok)
    train = load_prompts("train")
    draw = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(train), (answers // group,), generator=draw).tolist()

    began = time.perf_counter()
    own, per_call = [], max(1, batch // group)  # one batch of answers per sampling call
    for start in range(0, len(picks), per_call):
        own += rollouts(
            policy,
            [encode_chat(tok, user_turn(train[i])) for i in picks[start : start + per_call]],
            samples=group,
            max_tokens=ls.rollout_max_tokens,
            temperature=ls.rollout_temperature,
            pad=tok.pad_token_id,
            eos=eos,
            seed=seed * 1_000_003 + start,
            name=f"rf-{start}",
        )
    sample_s = time.perf_counter() - began
    prompts = [train[i] for i in picks for _ in range(group)]
    texts = [tok.decode(s.response_token_ids, skip_special_tokens=True) for s in own]
    pairs = list(zip(prompts, texts, strict=True))
    labels = {
        name: torch.tensor([float(rules.approves(rules.judge(j, p, a))) for p, a in pairs])
        for name, j in judges.items()
    }
    print(
        f"[bench reward-features] {answers} base answers in {sample_s:.0f} s; approval "
        + ", ".join(f"{n} {float(y.mean()):.1%}" for n, y in labels.items()),
        flush=True,
    )

    rows = []
    for variant, (layer, prompt) in VARIANTS.items():
        began = time.perf_counter()
        phi = torch.cat(
            [
                features(policy, Batch.from_samples(own[i : i + batch], tok.pad_token_id), layer, prompt)
                for i in range(0, len(own), batch)
            ]
        )
        features_s = time.perf_counter() - began
        for name, y in labels.items():
            scores, fit_s = prequential_scores(phi, y, batch, ls)
            figures = classify(scores, y[batch:])
            rows.append(
                {"rule": name, "variant": variant, "dim": phi.shape[1]}
                | {k: round(v, 4) for k, v in figures.items()}
                | {"features_s": round(features_s, 1), "fit_s": round(fit_s, 1)}
            )
            print(
                f"[bench reward-features] {name:10s} {variant:20s} D={phi.shape[1]:5d}  AUC "
                f"{figures['auc']:.3f}  accuracy {figures['accuracy']:.1%}  balanced "
                f"{figures['balanced_accuracy']:.1%}  log-loss {figures['log_loss']:.3f}  fits {fit_s:.0f} s",
                flush=True,
            )

    results = {
        "config": {"rules": rules_, "answers": answers, "batch": batch, "seed": seed, "model": settings.model}
        | {"learner": ls.model_dump(mode="json")}
        | machine(),
        "approval": {n: round(float(y.mean()), 4) for n, y in labels.items()},
        "always_down_accuracy": {n: round(1 - float(y[batch:].mean()), 4) for n, y in labels.items()},
        "sample_s": round(sample_s, 1),
        "rows": rows,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    return results
