"""`thumbtune bench exact-reward`: how fast the learner's PPO learns from its own answers when their reward
is exact, the bound on what any reward model can give it (issue 13).

The learner's `reward_model` signal scores its own answers with a learnt model of the users' ratings. Here
the model is replaced by the rule the simulated users rate by, so every own answer's reward is what a user
would say. No server, no users, no broker: the learner's rollout and PPO code alone, on the configured
model and the learner's settings (THUMBTUNE_LEARNER_*), one update after another.

    x_1 .. x_P     training prompts (bench loop's users' set), P = rollout_prompts, drawn anew per update
    y_i1 .. y_iG   ~ pi_theta(. | x_i), G = rollout_samples                  (learner/rollout.py `rollouts`)
    s_ij           +1 if the rule approves y_ij, else -1   (a thumb; a learnt model gives 2 sigma(r) - 1)
    R_ij           leave-one-out of s over the G answers    (`scored`, as the learner's own answers)

then one `ppo_update` (learner/update.py) and the Polyak average, exactly as `Learner.refine` does. Every
--every updates the published weights (the average) are evaluated as bench loop evaluates a version
(benchmarks/evaluate.py): approval on the held-out prompts, mean words, KL to the base, capability.

Read it against bench loop: with a reward model that is never wrong, this is how many updates of its own
answers (and how much learner time) the same PPO needs to reach 80%; a learnt reward model's errors are
expected to need more (run 19 against run 20 in docs/BENCHMARKS.md), not proven to.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from benchmarks.common import machine
from benchmarks.evaluate import Evaluator
from benchmarks.loop import TARGET_APPROVAL
from learner.config import LearnerSettings
from learner.distributed import SINGLE
from learner.policy import Batch, Policy, resolve_device, resolve_precision
from learner.rollout import rollouts, scored
from learner.update import LearnerState, ppo_update
from thumbtune.cli import rules
from thumbtune.cli.simulate import load_prompts
from thumbtune.core.base_model import load_base
from thumbtune.core.chat import encode_chat, end_token_ids, user_turn
from thumbtune.core.settings import Settings


def exact_rewards(rule: rules.Rule, prompts: list[str], answers: list[str]) -> torch.Tensor:
    """s = +1 where the rule approves the answer, -1 where not: [N] for N (prompt, answer) pairs."""
    verdicts = [rules.approves(rules.judge(rule, p, a)) for p, a in zip(prompts, answers, strict=True)]
    return torch.tensor([1.0 if ok else -1.0 for ok in verdicts])


def summarise(rows: list[dict], own_per_update: int) -> dict:
    """The first evaluated update at >= 80% (and its own answers and learner seconds), the lowest approval
    after it and the lowest capability."""
    first = next((r for r in rows if r["approval"] >= TARGET_APPROVAL), None)
    after = [r["approval"] for r in rows if first is not None and r["update"] > first["update"]]
    return {
        "baseline_approval": rows[0]["approval"],
        "final_approval": rows[-1]["approval"],
        "updates_to_target": first and first["update"],
        "own_answers_to_target": first and first["update"] * own_per_update,
        "learner_s_to_target": first and first["learner_s"],
        "min_approval_after_target": min(after) if after else None,
        "capability_base": rows[0]["capability"],
        "capability_min": min(r["capability"] for r in rows),
    }


def run(
    settings: Settings,
    *,
    rule: str = "concise",
    updates: int = 25,
    every: int = 5,
    seed: int = 0,
    learner: LearnerSettings | None = None,
    heldout: list[str] | None = None,
    out: Path | None = None,
) -> dict:
    """``updates`` PPO updates on own answers scored by ``rule``, evaluated every ``every``; the results."""
    if updates < 1 or every < 1:
        raise ValueError(f"--updates and --every must be >= 1, got {updates} and {every}")
    judge = rules.load_rule(rule)
    ls = learner or LearnerSettings()
    base = load_base(settings)
    tok = base.tokenizer
    device = resolve_device(ls.device)
    policy = Policy.fresh(
        base.model, settings, device, seed=ls.seed, autocast_dtype=resolve_precision(ls.precision, device)
    )
    state = LearnerState.create(policy, ls, seed=ls.seed)
    eos = end_token_ids(policy.model, tok)
    train = load_prompts("train")
    evaluator = Evaluator(policy.model, tok, heldout or load_prompts("heldout"), judge, seed=seed)
    draw = torch.Generator().manual_seed(seed)
    rows: list[dict] = []
    learner_s = 0.0

    def evaluate(update: int, own_approval: float | None) -> None:
        started = time.perf_counter()
        with state.average.published() if state.average else torch.no_grad():
            e = evaluator.evaluate()
        row = {
            "update": update,
            "own_answers": update * ls.rollout_prompts * ls.rollout_samples,
            "learner_s": round(learner_s, 1),
            "approval": round(e.approval, 4),
            "mean_words": round(e.mean_words, 2),
            "kl_to_base": round(e.kl_to_base, 5),
            "capability": e.capability,
            "own_approval": own_approval,
            "eval_s": round(time.perf_counter() - started, 1),
        }
        rows.append(row)
        print(
            f"[bench exact-reward] update {update:3d} ({row['own_answers']:5d} own answers, learner "
            f"{learner_s:6.0f} s)  approval {e.approval:6.1%}  words {e.mean_words:5.1f}  "
            f"KL {e.kl_to_base:.4f}/token  capability {e.capability}/{e.capability_of}",
            flush=True,
        )

    evaluate(0, None)
    for update in range(1, updates + 1):
        started = time.perf_counter()
        picks = torch.randperm(len(train), generator=draw)[: ls.rollout_prompts].tolist()
        own = rollouts(
            policy,
            [encode_chat(tok, user_turn(train[i])) for i in picks],
            samples=ls.rollout_samples,
            max_tokens=ls.rollout_max_tokens,
            temperature=ls.rollout_temperature,
            pad=tok.pad_token_id,
            eos=eos,
            seed=seed * 1_000_003 + update,
            name=f"exact-{update}",
        )
        texts = [tok.decode(s.response_token_ids, skip_special_tokens=True) for s in own]
        s = exact_rewards(judge, [train[i] for i in picks for _ in range(ls.rollout_samples)], texts)
        batch = Batch.from_samples(scored(own, s, ls.rollout_samples), tok.pad_token_id)
        ppo_update(policy, batch, state, ls, None, SINGLE)
        if state.average is not None:
            state.average.update()
        learner_s += time.perf_counter() - started
        if update % every == 0 or update == updates:
            evaluate(update, round(float((s > 0).float().mean()), 4))

    results = {
        "config": {"rule": rule, "updates": updates, "every": every, "seed": seed, "model": settings.model}
        | {"learner": ls.model_dump(mode="json")}
        | machine(),
        "summary": summarise(rows, ls.rollout_prompts * ls.rollout_samples),
        "rows": rows,
    }
    print(json.dumps(results["summary"], indent=2))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    return results
