"""`thumbtune bench kl-penalty`: where the reward's KL penalty falls, on answers a stored version samples.

For each version: --answers answers to training prompts (T = 1, --max-tokens), and per answer the sum
over its tokens of three estimates of KL(pi || pi_ref) (thumbtune/core/divergence.py):

    k1    = log pi(a_t) - log pi_ref(a_t)                 the reward's penalty by default
    k3    = (rho - 1) - log rho,  rho = pi_ref / pi       THUMBTUNE_LEARNER_KL_PENALTY=k3
    exact = sum_v pi(v | s_t) (log pi - log pi_ref)(v)    the divergence at the visited state itself

It prints each sum's mean and standard deviation over the answers, and its correlation with the rule's
approval. All three estimate the same KL; what differs is how much of the penalty beta * sum lands on the
approved answers (the correlation) and how much is noise (the spread beyond the exact sum's). With the
thumb's advantage whitened per batch, a penalty that correlates with approval takes back part of what the
thumbs teach.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from benchmarks.evaluate import Evaluator, activate_version
from learner.rollout import sample_with_logprobs
from thumbtune.cli import rules
from thumbtune.cli.simulate import load_prompts
from thumbtune.core.base_model import load_base
from thumbtune.core.contract import ADAPTER_CONFIG
from thumbtune.core.divergence import exact_kl, kl_k1, kl_k3
from thumbtune.core.settings import Settings

ESTIMATES = ("k1", "k3", "exact")


def _stats(values: torch.Tensor, approved: torch.Tensor) -> dict[str, float]:
    mean, std = values.mean().item(), values.std().item()
    both = torch.stack([values, approved])
    corr = torch.corrcoef(both)[0, 1].item() if std > 0 and approved.std() > 0 else float("nan")
    return {"mean": round(mean, 3), "std": round(std, 3), "corr_approval": round(corr, 3)}


@torch.no_grad()
def measure(model, tokenizer, judge, prompts: list[str], max_tokens: int, chunk: int = 16) -> dict:  # noqa: ANN001
    """The three per-answer KL sums of ``model`` (a PeftModel, adapter set) on answers it samples now."""
    ev = Evaluator(model, tokenizer, prompts[:1], judge, samples_per_prompt=1, max_tokens=max_tokens)
    encoded = [ev.encode(text) for text in prompts]
    sums: dict[str, list[float]] = {name: [] for name in ESTIMATES}
    approved, lengths = [], []
    for start in range(0, len(encoded), chunk):
        batch = encoded[start : start + chunk]
        sampled = sample_with_logprobs(model, batch, pad=ev.pad, eos=ev.eos, max_tokens=max_tokens)
        for text, prompt, (answer, _) in zip(prompts[start:], batch, sampled, strict=False):
            ids = torch.tensor([prompt + answer])
            cols = slice(len(prompt) - 1, ids.shape[1] - 1)  # the logits that predict the answer's tokens
            log_pi = model(input_ids=ids).logits[0, cols].float().log_softmax(-1)
            with model.disable_adapter():
                log_ref = model(input_ids=ids).logits[0, cols].float().log_softmax(-1)
            tokens = torch.tensor(answer).unsqueeze(1)
            lp, lr = log_pi.gather(1, tokens).squeeze(1), log_ref.gather(1, tokens).squeeze(1)
            sums["k1"].append(kl_k1(lp, lr).sum().item())
            sums["k3"].append(kl_k3(lp, lr).sum().item())
            sums["exact"].append(exact_kl(log_pi, log_ref).sum().item())
            words = tokenizer.decode([t for t in answer if t not in ev.eos], skip_special_tokens=True)
            approved.append(float(rules.approves(rules.judge(judge, text, words))))
            lengths.append(len(answer))
    up = torch.tensor(approved)
    return {
        "answers": len(approved),
        "approval": round(up.mean().item(), 4),
        "mean_tokens": round(sum(lengths) / len(lengths), 1),
        **{name: _stats(torch.tensor(values), up) for name, values in sums.items()},
    }


def run(
    settings: Settings,
    store: Path,
    versions: list[str],
    *,
    rule: str = "concise",
    answers: int = 64,
    max_tokens: int = 48,
    seed: int = 1,
    out: Path | None = None,
) -> dict:
    judge = rules.load_rule(rule)
    missing = [v for v in versions if not (store / v / ADAPTER_CONFIG).is_file()]
    if missing:
        raise ValueError(f"no adapter {', '.join(missing)} in {store}")
    base = load_base(settings)
    prompts = random.Random(seed).sample(load_prompts("train"), answers)
    model, results = None, {}
    for version in versions:
        model = activate_version(model, base.model, store / version, version)
        torch.manual_seed(seed)
        r = results[version] = measure(model, base.tokenizer, judge, prompts, max_tokens)
        line = "  ".join(
            f"sum {name} {r[name]['mean']:.2f} +- {r[name]['std']:.2f} (corr {r[name]['corr_approval']:+.2f})"
            for name in ESTIMATES
        )
        print(f"{version}: approval {r['approval']:.0%}, {r['mean_tokens']:.1f} tokens  {line}", flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"store": str(store), "rule": rule, "versions": results}, indent=2))
    return results
