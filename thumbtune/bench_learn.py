"""`thumbtune bench learn`: PPO update throughput of the learner vs the floor of any PPO update vs TRL.

One fixed set of 64 rated answers on the configured model (default: the embedded SmolLM2-135M-Instruct):
32 everyday prompts (chat template with a one-line system message: 31-35 tokens) x 2 answers sampled from the
model (seeded, T = 1, up to 32 tokens, stopped at <|im_end|>) with their real behaviour log-probs; per
prompt one answer is rated +1 and the other -1. The set is sampled once per run into a JSONL file that
every contender reads, so all of them train on the same token ids. LoRA r = 8 on q_proj, v_proj everywhere.

Contenders (DESCRIPTIONS below; TRL's set-up in thumbtune/bench_learn_trl.py) run one at a time, each in
its own subprocess (so its peak RSS, VmHWM, is its own), repeated and interleaved; medians are reported.
floor = what any PPO update on these samples pays; ours = learner.update.ppo_update, early stop off.
throughput = event-epochs/s = 64 events x 4 epochs / the update's wall time (model loading excluded).
Benchmark only; nothing in the product imports this.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from thumbtune.bench_naive import PROMPTS as _SERVE_PROMPTS
from thumbtune.settings import Settings

PROMPTS = _SERVE_PROMPTS + [
    "What is a quick way to clean a microwave?",
    "How do I start running if I have never done it?",
    "What can I cook with rice, eggs and spinach?",
    "How do I keep my houseplants alive in winter?",
    "What are good questions to ask at a job interview?",
    "How can I make my mornings less rushed?",
    "Why do onions make people cry when cutting them?",
    "What is a good gift for a friend who likes books?",
    "How do I fold a fitted sheet neatly?",
    "What should I do when my phone battery drains fast?",
    "How can I learn new words in a foreign language?",
    "What is a simple way to organise my desk?",
    "How do I make a paper airplane that flies far?",
    "What are easy ways to drink more water each day?",
    "How long should I boil an egg for a soft yolk?",
    "What should I look for when buying a used bike?",
]
SYSTEM = "You are a helpful assistant. Answer briefly."
N_EVENTS, EPOCHS, MINIBATCH, MAX_TOKENS, SEED = 64, 4, 16, 32, 1234
LORA_TARGETS = ("q_proj", "v_proj")
CONTENDERS = ("floor", "ours", "ours-bf16", "trl")
DESCRIPTIONS = {
    "floor": "no grad: 4 minibatches of 16 with the adapter on (pi_old) + 4 with it off (pi_ref); then 4 "
    "epochs x 4 minibatches of forward+backward, loss = -mean response log-prob, log-probs the "
    "learner's way (LM head on response positions only) via one cross-entropy; no value head, KL or "
    "optimizer step",
    "ours": "learner.update.ppo_update: no grad, pi_old (+ values, entropy, tempered log-probs) and pi_ref; "
    "KL-penalised rewards, GAE, importance weights; 16 steps of clipped policy + value loss, AdamW "
    "(on CPU no pass holds over 1024 padded tokens: chunked no-grad passes, minibatches as 2 x 8)",
    "ours-bf16": "ours with THUMBTUNE_LEARNER_PRECISION=bfloat16 (torch.autocast on CPU; what 'auto' picks "
    "on CPUs with AMX or AVX512-BF16); only run where the CPU has one of them, else bf16 is emulated",
    "trl": "trl GRPOTrainer: rollout_func replays the answers, fixed +1/-1 rewards in groups of 2, "
    "scale_rewards=none, num_iterations=4, beta=0.05 (pi_ref pass), 16 steps; timed "
    "on_train_begin..on_train_end",
}
TARGETS = {"vs_trl": 1.3, "vs_floor": 0.75, "rss_gib": 3.0}
WORKER_TIMEOUT_S = 1200


def bench_settings(settings: Settings) -> Settings:
    """The configured model, cache and threads with the comparison's LoRA shape (r = 8 on q_proj, v_proj)."""
    return settings.model_copy(
        update={"lora_r": 8, "lora_alpha": 16, "lora_target_modules": list(LORA_TARGETS)}
    )


# --- inside a worker process -------------------------------------------------------------------------------


def _load(settings: Settings):
    import torch

    from thumbtune.base_model import load_base

    if settings.num_threads > 0:
        torch.set_num_threads(settings.num_threads)
    return load_base(settings)


def _busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (/proc/stat: all but idle and iowait)."""
    with contextlib.suppress(OSError, ValueError):
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")
    return 0.0


class Window:
    """One timed update: wall seconds, this process's CPU seconds, and the cores other processes kept busy
    meanwhile (others' work on this machine is noise; the CPU seconds are less sensitive to it)."""

    def __init__(self) -> None:
        self.t0, self.own0, self.all0 = time.perf_counter(), self._own(), _busy_s()

    @staticmethod
    def _own() -> float:
        return (t := os.times()).user + t.system

    def stop(self) -> dict:
        wall, own, busy = time.perf_counter() - self.t0, self._own() - self.own0, _busy_s() - self.all0
        return {"update_s": wall, "cpu_s": own, "other_cores": max(0.0, busy - own) / max(wall, 1e-9)}


def _peak_rss() -> int:
    """This process's peak resident set (VmHWM) in bytes."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(ln for ln in status if ln.startswith("VmHWM:")).split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_events(settings: Settings, path: Path) -> dict:
    """Sample the fixed set (2 answers per prompt, seeded) and write it as FeedbackEvent JSONL."""
    import torch

    from thumbtune.contract import FeedbackEvent, FeedbackKind, Message, SamplingParams
    from thumbtune.evaluate import sample_with_logprobs

    base = _load(settings)
    tok = base.tokenizer
    conversations = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
        for text in PROMPTS[: N_EVENTS // 2]
    ]
    prompts = [
        list(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False))
        for m in conversations
    ]
    started = time.perf_counter()
    torch.manual_seed(SEED)
    sampled = sample_with_logprobs(
        base.model,
        [p for p in prompts for _ in range(2)],
        pad=tok.pad_token_id,
        eos=[tok.eos_token_id],
        max_tokens=MAX_TOKENS,
    )
    lines = []
    for i, (answer, lps) in enumerate(sampled):
        k, reward = i // 2, 1.0 if i % 2 == 0 else -1.0
        event = FeedbackEvent(
            event_id=f"bench-learn-{i:03d}",
            response_id=f"resp-{i:03d}",
            completion_id=f"chatcmpl-{k:03d}",
            api_key_id=None,
            answered_at=1.0,
            rated_at=2.0,
            base_model=base.model_id,
            base_fingerprint=base.fingerprint,
            adapter_version="v0",
            messages=[Message(**m) for m in conversations[k]],
            prompt_token_ids=prompts[k],
            response_token_ids=answer,
            behaviour_logprobs=lps,
            sampling=SamplingParams(temperature=1.0, top_p=1.0, max_tokens=MAX_TOKENS),
            finish_reason="stop" if answer[-1] == tok.eos_token_id else "length",
            kind=FeedbackKind.thumb,
            value="up" if reward > 0 else "down",
            reward=reward,
        )
        lines.append(event.model_dump_json())
    path.write_text("\n".join(lines) + "\n")
    return {"sample_s": time.perf_counter() - started}


def _warm_up(model, batch) -> None:
    """The same untimed no-grad forward of the plain base on one minibatch in every contender's process."""
    import torch

    mb = batch.subset(torch.arange(MINIBATCH))
    with torch.no_grad():
        model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, logits_to_keep=1)


def run_floor(base, events: list, settings: Settings) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import get_peft_model

    from learner.policy import Batch
    from service.engine.adapters import lora_config

    batch = Batch.from_events(events, base.tokenizer.pad_token_id)
    _warm_up(base.model, batch)
    torch.manual_seed(0)
    model = get_peft_model(base.model, lora_config(settings))
    model.eval()
    hf = model.get_base_model()
    body, head = hf.base_model, hf.get_output_embeddings()
    params = [p for p in model.parameters() if p.requires_grad]

    def response_logprobs(mb: Batch) -> torch.Tensor:
        hidden = body(input_ids=mb.input_ids, attention_mask=mb.attention_mask).last_hidden_state
        t = torch.arange(mb.mask.shape[1])
        last = (mb.mask.sum(1).long() - 1).clamp(min=0).unsqueeze(1)
        positions = mb.prompt_lens.unsqueeze(1) - 1 + torch.minimum(t.unsqueeze(0), last)
        gathered = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        logits = head(gathered)  # [B, T, V]: the LM head on response positions only
        nll = F.cross_entropy(logits.flatten(0, 1), mb.response_ids.flatten(), reduction="none")
        return -nll.view_as(mb.mask) * mb.mask

    window = Window()
    minibatches = [batch.subset(index) for index in torch.arange(len(batch)).split(MINIBATCH)]
    with torch.no_grad():
        for mb in minibatches:  # pi_old
            response_logprobs(mb)
        with model.disable_adapter():
            for mb in minibatches:  # pi_ref
                response_logprobs(mb)
    for _ in range(EPOCHS):
        for mb in minibatches:
            loss = -response_logprobs(mb).sum() / mb.mask.sum()
            loss.backward()
            for p in params:
                p.grad = None
    return window.stop() | {"steps": EPOCHS * len(minibatches)}


def run_ours(base, events: list, settings: Settings, bf16: bool = False) -> dict:
    import torch

    from learner.config import LearnerSettings
    from learner.policy import Batch, Policy
    from learner.update import LearnerState, finite, ppo_update

    learner = LearnerSettings(epochs=EPOCHS, minibatch_size=MINIBATCH, early_stop_kl=None, device="cpu")
    cfg = learner.ppo_config()
    _warm_up(base.model, Batch.from_events(events, base.tokenizer.pad_token_id))
    policy = Policy.fresh(
        base.model,
        settings,
        torch.device("cpu"),
        seed=learner.seed,
        autocast_dtype=torch.bfloat16 if bf16 else None,
    )
    state = LearnerState.create(policy, cfg, learner.weight_decay, seed=learner.seed)
    window = Window()
    diagnostics = ppo_update(policy, Batch.from_events(events, base.tokenizer.pad_token_id), state, cfg)
    return window.stop() | {
        "steps": int(diagnostics["epochs"]) * -(-len(events) // MINIBATCH),
        "diagnostics": finite(diagnostics),
        "config": vars(cfg),
    }


def worker(contender: str, events_path: Path) -> dict:
    from thumbtune.contract import FeedbackEvent

    settings = bench_settings(Settings())
    base = _load(settings)
    events = [FeedbackEvent.model_validate_json(line) for line in events_path.read_text().splitlines()]
    if contender == "floor":
        result = run_floor(base, events, settings)
    elif contender in ("ours", "ours-bf16"):
        result = run_ours(base, events, settings, bf16=contender == "ours-bf16")
    else:
        from thumbtune.bench_learn_trl import run_trl

        result = run_trl(base, events, settings, epochs=EPOCHS, minibatch=MINIBATCH, max_tokens=MAX_TOKENS)
    return result | {
        "contender": contender,
        "rss_peak_bytes": _peak_rss(),
        "threads": __import__("torch").get_num_threads(),
        "event_epochs_per_s": len(events) * EPOCHS / result["update_s"],
        "event_epochs_per_cpu_s": len(events) * EPOCHS / result["cpu_s"],
    }


# --- the parent: subprocesses, table, targets --------------------------------------------------------------


def _spawn(args: list[str]) -> dict:
    argv = [sys.executable, "-m", "thumbtune.bench_learn", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, check=False
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise RuntimeError(f"{' '.join(args[:2])} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def run(settings: Settings, out: Path | None = None, repeats: int = 3, with_trl: bool = True) -> dict:
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=120)
    started = time.perf_counter()
    from learner.policy import cpu_has_fast_bf16

    have_trl = with_trl and importlib.util.find_spec("trl") is not None
    have_fast_bf16 = cpu_has_fast_bf16()
    contenders = [c for c in CONTENDERS if (c != "trl" or have_trl) and (c != "ours-bf16" or have_fast_bf16)]
    runs: dict[str, list[dict]] = {c: [] for c in contenders}
    with tempfile.TemporaryDirectory(prefix="thumbtune-bench-learn-") as tmp:
        events_path = Path(tmp) / "events.jsonl"
        console.print(
            f"[bold]events[/]: sampling {N_EVENTS} answers (<= {MAX_TOKENS} tokens) from "
            f"THUMBTUNE_MODEL={settings.model!r} ..."
        )
        info = _spawn(["events", "--out", str(events_path)])
        events = [json.loads(line) for line in events_path.read_text().splitlines()]
        p, a = ([len(e[k]) for e in events] for k in ("prompt_token_ids", "response_token_ids"))
        info |= {
            "events": len(events),
            "answer_tokens_total": sum(a),
            "prompt_tokens": {"min": min(p), "mean": statistics.mean(p), "max": max(p)},
            "answer_tokens": {"min": min(a), "mean": statistics.mean(a), "max": max(a)},
            "stopped_at_eos": sum(e["finish_reason"] == "stop" for e in events),
        }
        for r in range(repeats):
            order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
            for contender in order:
                res = _spawn(["worker", contender, "--events", str(events_path)])
                runs[contender].append(res)
                console.print(
                    f"  run {r + 1}/{repeats} {contender:>5}: {res['update_s']:6.1f} s "
                    f"(CPU {res['cpu_s']:.0f} s) = {res['event_epochs_per_s']:.2f} event-epochs/s, "
                    f"peak RSS {res['rss_peak_bytes'] / 2**30:.2f} GiB, other processes "
                    f"{res['other_cores']:.2f} cores"
                )
    result = report(console, runs, info, have_trl, with_trl, repeats, time.perf_counter() - started)
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
        console.print(f"wrote {out}")
    return result


def report(
    console,
    runs: dict[str, list[dict]],
    info: dict,
    have_trl: bool,
    asked_trl: bool,
    repeats: int,
    elapsed: float,
) -> dict:
    from rich.table import Table

    def median(c: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[c])

    med = {
        c: {k: median(c, k) for k in ("event_epochs_per_s", "event_epochs_per_cpu_s", "update_s", "cpu_s")}
        | {"rss_peak_bytes": max(r["rss_peak_bytes"] for r in runs[c])}
        for c in runs
    }
    table = Table(
        title=f"thumbtune bench learn: {info['events']} events x {EPOCHS} epochs, minibatch "
        f"{MINIBATCH}, LoRA r=8 on {','.join(LORA_TARGETS)}, CPU, "
        f"{runs['ours'][0]['threads']} torch threads; medians of {repeats} runs"
    )
    for col in (
        "contender",
        "update s, each run",
        "median s",
        "event-epochs/s",
        "per CPU-s",
        "peak RSS GiB",
        "other CPU, each run",
    ):
        table.add_column(col, justify="left" if col == "contender" else "right")
    for c, rs in runs.items():
        table.add_row(
            c,
            " ".join(f"{r['update_s']:.1f}" for r in rs),
            f"{med[c]['update_s']:.1f}",
            f"{med[c]['event_epochs_per_s']:.2f}",
            f"{med[c]['event_epochs_per_cpu_s']:.2f}",
            f"{med[c]['rss_peak_bytes'] / 2**30:.2f}",
            " ".join(f"{r['other_cores']:.2f}" for r in rs),
        )
    console.print(table)
    for name, text in DESCRIPTIONS.items():
        console.print(f"  {name:>5}: {text}")
    pt, at = info["prompt_tokens"], info["answer_tokens"]
    console.print(
        f"events: prompts {pt['min']}-{pt['max']} tokens (mean {pt['mean']:.1f}), answers "
        f"{at['min']}-{at['max']} (mean {at['mean']:.1f}, {info['stopped_at_eos']} stopped at "
        "EOS), +1/-1 per prompt pair; 'per CPU-s' = event-epochs per second of the process's own "
        "CPU time; peak RSS = the largest VmHWM of the contender's runs"
    )
    noisy = max(r["other_cores"] for rs in runs.values() for r in rs)
    if noisy > 0.15:
        console.print(
            f"[yellow]warning: other processes kept up to {noisy:.2f} of this machine's "
            f"{os.cpu_count()} cores busy during some runs (column 'other CPU'): those figures are "
            "noisy; rerun when idle"
        )

    ours = med["ours"]["event_epochs_per_s"]
    vs_floor = ours / med["floor"]["event_epochs_per_s"]
    vs_trl = ours / med["trl"]["event_epochs_per_s"] if have_trl else None
    rss_gib = med["ours"]["rss_peak_bytes"] / 2**30
    checks = [
        (
            "ours / TRL GRPOTrainer, event-epochs/s",
            f"{vs_trl:.2f}x" if vs_trl else "not run",
            f">= {TARGETS['vs_trl']}x",
            None if vs_trl is None else vs_trl >= TARGETS["vs_trl"],
        ),
        (
            "ours / floor, event-epochs/s",
            f"{vs_floor:.0%}",
            f">= {TARGETS['vs_floor']:.0%}",
            vs_floor >= TARGETS["vs_floor"],
        ),
        (
            "ours peak RSS (VmHWM)",
            f"{rss_gib:.2f} GiB",
            f"<= {TARGETS['rss_gib']:.0f} GiB",
            rss_gib <= TARGETS["rss_gib"],
        ),
    ]
    targets = Table(title="targets")
    for col in ("check", "measured", "target", ""):
        targets.add_column(col)
    for name, measured, target, ok in checks:
        verdict = "[dim]n/a[/]" if ok is None else "[green]PASS[/]" if ok else "[red]MISS[/]"
        targets.add_row(name, measured, target, verdict)
    console.print(targets)
    if "ours-bf16" in med:
        bf16_speedup = med["ours-bf16"]["event_epochs_per_s"] / ours
        console.print(
            f"bf16 autocast (precision 'auto' on this CPU): {bf16_speedup:.2f}x ours in float32, "
            f"peak RSS {med['ours-bf16']['rss_peak_bytes'] / 2**30:.2f} GiB"
        )
    else:
        bf16_speedup = None
        console.print(
            "ours-bf16 not run: this CPU has neither AMX nor AVX512-BF16, so precision 'auto' is float32"
        )
    if not have_trl:
        why = "trl is not installed (pip install 'thumbtune[bench]')" if asked_trl else "--no-trl"
        console.print(f"TRL not measured: {why}")
    console.print(f"whole bench {elapsed:.0f} s (events sampled in {info['sample_s']:.0f} s)")
    return {
        "events": info,
        "epochs": EPOCHS,
        "minibatch": MINIBATCH,
        "repeats": repeats,
        "elapsed_s": elapsed,
        "lora": {"r": 8, "alpha": 16, "target_modules": list(LORA_TARGETS)},
        "contenders": DESCRIPTIONS,
        "runs": runs,
        "medians": med,
        "ratios": {"ours_vs_trl": vs_trl, "ours_vs_floor": vs_floor, "bf16_vs_float32": bf16_speedup},
        "targets": {name: {"measured": m, "target": t, "pass": ok} for name, m, t, ok in checks},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("events")
    ev.add_argument("--out", type=Path, required=True)
    wk = sub.add_parser("worker")
    wk.add_argument("contender", choices=CONTENDERS)
    wk.add_argument("--events", type=Path, required=True)
    args = parser.parse_args()
    if args.cmd == "events":
        result = make_events(bench_settings(Settings()), args.out)
    else:
        result = worker(args.contender, args.events)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
