"""`thumbtune bench ablate`: learner settings side by side on the same simulated users, no serving path.

Each arm is a set of THUMBTUNE_LEARNER_* overrides (``lam=1.0,kl_coef=0.3``) and runs in its own process
with one torch thread, all arms at once, so their figures come from one run on the same machine. An arm is
an on-policy loop:

    sample --batch-size answers to training prompts with the current adapter (T = 1, --max-tokens)
    -> rate each with the rule -> `learner.update.ppo_update` -> the next version

for --versions versions, every arm drawing the same prompts in the same order. Every --eval-every
versions (and at the last) the adapter is evaluated offline as `bench loop` does (`benchmarks.evaluate`):
approval on the held-out prompts, mean words, exact KL to the base, the capability probe.

What it isolates: the learner's sample efficiency (approval per rating, and what that costs in KL and
capability). No broker, no server, no staleness, no swaps: `thumbtune bench loop` measures the deployed
loop; this picks the learner's defaults.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from benchmarks.common import machine, thumb_event, worker_argv, worker_env
from benchmarks.evaluate import Evaluator
from learner.checkpoint import save_version
from learner.config import LearnerSettings, PPOConfig
from learner.policy import Batch, Policy, resolve_precision
from learner.rollout import sample_with_logprobs
from learner.update import LearnerState, finite, ppo_update
from thumbtune.cli import rules
from thumbtune.cli.simulate import load_prompts
from thumbtune.core.base_model import load_base
from thumbtune.core.settings import Settings
from thumbtune.core.store import LocalAdapterStore

RESULT_PREFIX = "ABLATE-RESULT "


def parse_arm(spec: str) -> dict[str, str]:
    """'lam=1.0,kl_coef=0.3' -> {'lam': '1.0', 'kl_coef': '0.3'}, names checked against LearnerSettings."""
    overrides: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip().lower().removeprefix("thumbtune_learner_")
        if not sep or name not in LearnerSettings.model_fields:
            known = ", ".join(LearnerSettings.model_fields)
            raise ValueError(f"arm {spec!r}: {part!r} is not NAME=VALUE with NAME one of: {known}")
        overrides[name] = value.strip()
    LearnerSettings(**overrides)  # a bad value fails here, before any process starts
    return overrides


def run_arm(
    settings: Settings,
    overrides: dict[str, str],
    *,
    rule: str,
    versions: int,
    batch_size: int,
    max_tokens: int,
    eval_every: int,
    samples_per_prompt: int,
    seed: int,
    store: Path | None = None,
) -> dict:
    """One arm in this process; returns its per-version rows and evaluations. With ``store``, the last
    version is also written there as the learner writes its versions (`bench canary` serves it)."""
    judge = rules.load_rule(rule)
    learner = LearnerSettings(**overrides, device="cpu")
    base = load_base(settings)
    tok = base.tokenizer
    device = torch.device("cpu")
    policy = Policy.fresh(
        base.model, settings, device, learner.seed, resolve_precision(learner.precision, device)
    )
    state = LearnerState.create(policy, learner, seed=learner.seed)
    published = state.average.published if state.average else nullcontext  # what a server would serve
    train = load_prompts("train")
    evaluator = Evaluator(  # the held-out evaluation, and the chat encoding and end tokens the arm uses
        policy.model,
        tok,
        load_prompts("heldout"),
        judge,
        samples_per_prompt=samples_per_prompt,
        max_tokens=max_tokens,
        seed=seed,
    )
    eos = evaluator.eos
    draw = random.Random(seed)
    torch.manual_seed(seed)

    def evaluate(version: int) -> dict:
        with published():
            ev = evaluator.evaluate()
        return {
            "version": version,
            "thumbs": version * batch_size,
            "approval": round(ev.approval, 4),
            "mean_words": round(ev.mean_words, 2),
            "kl_to_base": round(ev.kl_to_base, 5),
            "capability": ev.capability,
            "capability_of": ev.capability_of,
        }

    rows, evaluations = [], []
    for v in range(1, versions + 1):
        started = time.perf_counter()
        texts = draw.sample(train, batch_size)
        conversations = [[{"role": "user", "content": text}] for text in texts]
        prompts = [evaluator.encode(text) for text in texts]
        with published():
            sampled = sample_with_logprobs(
                policy.model, prompts, pad=evaluator.pad, eos=eos, max_tokens=max_tokens
            )
        events, approved = [], []
        for i, answer in enumerate(sampled):
            text = tok.decode([t for t in answer[0] if t not in eos], skip_special_tokens=True)
            up = rules.approves(rules.judge(judge, texts[i], text))
            approved.append(up)
            ids = (f"ablate-{v}-{i}", f"resp-{v}-{i}", f"chatcmpl-{v}-{i}")
            events.append(
                thumb_event(
                    base,
                    ids,
                    conversations[i],
                    prompts[i],
                    answer,
                    up=up,
                    adapter_version=policy.version,
                    max_tokens=max_tokens,
                    eos=eos,
                )
            )
        sample_s = time.perf_counter() - started
        diagnostics = finite(ppo_update(policy, Batch.from_events(events, tok.pad_token_id), state, learner))
        if state.average is not None:
            diagnostics["average_gap"] = state.average.update()
        policy.version = f"v{v}"
        rows.append(
            {
                "version": v,
                "approval": sum(approved) / len(approved),
                "sample_s": round(sample_s, 1),
                **{
                    k: round(diagnostics[k], 4)
                    for k in ("kl_ref", "kl_ref_k3_per_token", "approx_kl", "update_s", "average_gap")
                    if k in diagnostics
                },
                **({"kl_loss": round(diagnostics["kl_loss"], 4)} if "kl_loss" in diagnostics else {}),
            }
        )
        print(f"[{policy.version}] " + json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if v % eval_every == 0 or v == versions:
            evaluations.append(evaluate(v))
            print(f"[{policy.version}] eval " + json.dumps(evaluations[-1]), file=sys.stderr, flush=True)
    if store is not None:
        version = save_version(LocalAdapterStore(store), policy, state, base=base, event_ids=[])
        print(f"[{version}] saved in {store}", file=sys.stderr, flush=True)
    return {
        "overrides": overrides,
        "config": {name: getattr(learner, name) for name in PPOConfig.model_fields},
        "versions": rows,
        "evaluations": evaluations,
    }


def _window(rows: list[dict], lo: int, hi: int) -> str:
    part = [r["approval"] for r in rows if lo < r["version"] <= hi]
    return f"{sum(part) / len(part):.0%}" if part else "-"


def report(results: dict) -> list[str]:
    """A table per arm: live approval (the batches it trained on) by thirds, then each evaluation."""
    lines = []
    for name, arm in results["arms"].items():
        rows, n = arm["versions"], len(arm["versions"])
        thirds = [_window(rows, n * k // 3, n * (k + 1) // 3) for k in range(3)]
        lines.append(f"arm {name}: batch approval by thirds {' / '.join(thirds)}")
        for e in arm["evaluations"]:
            lines.append(
                f"  v{e['version']:<3} {e['thumbs']:>5} ratings  held-out approval {e['approval']:6.1%}  "
                f"words "
                f"{e['mean_words']:5.1f}  KL {e['kl_to_base']:.4f}/token  capability {e['capability']}/"
                f"{e['capability_of']}"
            )
    return lines


def run(
    settings: Settings,
    arms: list[str],
    *,
    rule: str = "concise",
    versions: int = 24,
    batch_size: int = 32,
    max_tokens: int = 48,
    eval_every: int = 1_000_000,
    samples_per_prompt: int = 2,
    seed: int = 1,
    out: Path | None = None,
) -> dict:
    """Every arm at once, one process and one thread each; prints the table, writes ``out`` (JSON)."""
    parsed = {spec or "defaults": parse_arm(spec) for spec in arms}
    args = [
        str(versions),
        str(batch_size),
        str(max_tokens),
        str(eval_every),
        str(samples_per_prompt),
        str(seed),
    ]
    env = worker_env(OMP_NUM_THREADS="1", THUMBTUNE_NUM_THREADS="1")
    procs = {
        name: subprocess.Popen(
            worker_argv("ablate", rule, json.dumps(overrides), *args),
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name, overrides in parsed.items()
    }
    results: dict = {
        "rule": rule,
        "versions": versions,
        "batch_size": batch_size,
        "max_tokens": max_tokens,
        "seed": seed,
        **machine(),
        "arms": {},
    }
    for name, proc in procs.items():
        stdout, _ = proc.communicate()
        line = next((ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"arm {name!r} failed (exit {proc.returncode}); its log is above")
        results["arms"][name] = json.loads(line.removeprefix(RESULT_PREFIX))
    for line in report(results):
        print(line)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"[bench ablate] wrote {out}")
    return results


def _worker(argv: list[str]) -> None:
    torch.set_num_threads(1)
    rule, overrides = argv[0], json.loads(argv[1])
    versions, batch_size, max_tokens, eval_every, samples, seed = (int(x) for x in argv[2:8])
    result = run_arm(
        Settings(),
        overrides,
        rule=rule,
        versions=versions,
        batch_size=batch_size,
        max_tokens=max_tokens,
        eval_every=eval_every,
        samples_per_prompt=samples,
        seed=seed,
    )
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1:])
