"""`thumbtune bench learn`: PPO update throughput of the learner vs the floor of any PPO update vs TRL.

One fixed set of 64 rated answers on the configured model (default: the embedded SmolLM2-135M-Instruct):
32 everyday prompts (chat template with a one-line system message: 31-35 tokens) x 2 answers sampled from the
model (seeded, T = 1, up to 32 tokens, stopped at <|im_end|>) with their real behaviour log-probs; per
prompt one answer is rated +1 and the other -1. The set is sampled once per run into a JSONL file that
every contender reads, so all of them train on the same token ids. LoRA r = 8 on q_proj, v_proj everywhere.

Contenders (DESCRIPTIONS below; TRL's set-up in benchmarks/learn_trl.py) run one at a time, each in
its own subprocess (so its peak RSS, VmHWM, is its own), repeated and interleaved; medians are reported.
floor = what any PPO update on these samples pays; ours = learner.update.ppo_update, early stop off.
throughput = event-epochs/s = 64 events x 4 epochs / the update's wall time (model loading excluded).
ours-2ranks is ours under torchrun as two data-parallel ranks of one thread each (learner/distributed.py),
on the same events and seed: its update time against ours, and how far its weights end from ours (max |w|
difference; the same sums in another order). The table and the targets: benchmarks/learn_report.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import get_peft_model
from rich.console import Console

from benchmarks.common import Window, load, peak_rss, thumb_event, warm_up, worker_argv, worker_env
from benchmarks.learn_report import report
from benchmarks.prompts import LEARN as PROMPTS
from learner.config import LearnerSettings, PPOConfig
from learner.distributed import SINGLE, DataParallel, from_environment, leave
from learner.policy import Batch, Policy, cpu_has_fast_bf16
from learner.rollout import sample_with_logprobs
from learner.update import LearnerState, finite, ppo_update
from thumbtune.cli.process import free_port
from thumbtune.core.chat import encode_chat, end_token_ids
from thumbtune.core.contract import FeedbackEvent
from thumbtune.core.lora import lora_config
from thumbtune.core.settings import Settings

SYSTEM = "You are a helpful assistant. Answer briefly."
N_EVENTS, EPOCHS, MINIBATCH, MAX_TOKENS, SEED = 64, 4, 16, 32, 1234
LORA_TARGETS = ("q_proj", "v_proj")
CONFIG = {
    "epochs": EPOCHS,
    "minibatch": MINIBATCH,
    "lora": {"r": 8, "alpha": 16, "target_modules": list(LORA_TARGETS)},
}
CONTENDERS = ("floor", "ours", "ours-bf16", "ours-2ranks", "trl")
RANKS = 2
"""ours-2ranks: data-parallel processes, one torch thread each."""
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
    "ours-2ranks": f"ours as {RANKS} data-parallel ranks under torchrun (learner/distributed.py), one torch "
    "thread each: each computes its share of the rows, gradients all-reduced over gloo; CPU s and peak RSS "
    "are the ranks' sums",
    "trl": "trl GRPOTrainer: rollout_func replays the answers, fixed +1/-1 rewards in groups of 2, "
    "scale_rewards=none, num_iterations=4, beta=0.05 (pi_ref pass), 16 steps; timed "
    "on_train_begin..on_train_end",
}
WORKER_TIMEOUT_S = 1200


def bench_settings(settings: Settings) -> Settings:
    """The configured model, cache and threads with the comparison's LoRA shape (r = 8 on q_proj, v_proj)."""
    return settings.model_copy(
        update={"lora_r": 8, "lora_alpha": 16, "lora_target_modules": list(LORA_TARGETS)}
    )


# --- inside a worker process -------------------------------------------------------------------------------


def make_events(settings: Settings, path: Path) -> dict:
    """Sample the fixed set (2 answers per prompt, seeded) and write it as FeedbackEvent JSONL."""
    base = load(settings)
    tok = base.tokenizer
    conversations = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
        for text in PROMPTS[: N_EVENTS // 2]
    ]
    prompts = [encode_chat(tok, m) for m in conversations]
    started = time.perf_counter()
    torch.manual_seed(SEED)
    eos = end_token_ids(base.model, tok)
    sampled = sample_with_logprobs(
        base.model,
        [p for p in prompts for _ in range(2)],
        pad=tok.pad_token_id,
        eos=eos,
        max_tokens=MAX_TOKENS,
    )
    lines = []
    for i, answer in enumerate(sampled):
        k = i // 2  # the prompt's first answer is rated up, its second down
        ids = (f"bench-learn-{i:03d}", f"resp-{i:03d}", f"chatcmpl-{k:03d}")
        event = thumb_event(
            base,
            ids,
            conversations[k],
            prompts[k],
            answer,
            up=i % 2 == 0,
            adapter_version="v0",
            max_tokens=MAX_TOKENS,
            eos=eos,
        )
        lines.append(event.to_bytes().decode())
    path.write_text("\n".join(lines) + "\n")
    return {"sample_s": time.perf_counter() - started}


def run_floor(base, events: list, settings: Settings) -> dict:  # noqa: ANN001 - a LoadedBase
    batch = Batch.from_events(events, base.tokenizer.pad_token_id)
    warm_up(base.model, batch, MINIBATCH)
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


def run_ours(  # noqa: ANN001
    base,
    events: list,
    settings: Settings,
    bf16: bool = False,
    dp: DataParallel = SINGLE,
    params: Path | None = None,
) -> dict:
    # the update alone: no Polyak average (the learner updates it after ppo_update, outside the timing)
    learner = LearnerSettings(
        epochs=EPOCHS, minibatch_size=MINIBATCH, early_stop_kl=None, average_decay=0.0, device="cpu"
    )
    warm_up(base.model, Batch.from_events(events, base.tokenizer.pad_token_id), MINIBATCH)
    policy = Policy.fresh(
        base.model,
        settings,
        torch.device("cpu"),
        seed=learner.seed,
        autocast_dtype=torch.bfloat16 if bf16 else None,
    )
    state = LearnerState.create(policy, learner, seed=learner.seed)
    window = Window()
    diagnostics = ppo_update(
        policy, Batch.from_events(events, base.tokenizer.pad_token_id), state, learner, None, dp
    )
    timed = window.stop()
    if params is not None and dp.leader:  # the weights, to compare ours with ours-2ranks
        torch.save([p.detach() for p in policy.parameters()], params)
    return timed | {
        "steps": int(diagnostics["epochs"]) * -(-len(events) // MINIBATCH),
        "diagnostics": finite(diagnostics),
        "config": {name: getattr(learner, name) for name in PPOConfig.model_fields},
    }


def worker(contender: str, events_path: Path, params: Path | None = None) -> dict | None:
    dp = from_environment() if contender == "ours-2ranks" else SINGLE
    settings = bench_settings(Settings())
    base = load(settings)
    events = [FeedbackEvent.model_validate_json(line) for line in events_path.read_text().splitlines()]
    if contender == "floor":
        result = run_floor(base, events, settings)
    elif contender in ("ours", "ours-bf16", "ours-2ranks"):
        result = run_ours(base, events, settings, contender == "ours-bf16", dp, params)
        if dp.world > 1:  # the ranks' CPU time and peak memory together; rank 0 reports
            summed = dp.sum_floats({"cpu_s": result["cpu_s"], "rss_peak_bytes": float(peak_rss())})
            leave(dp)
            if not dp.leader:
                return None
            others = result["other_cores"] - (summed["cpu_s"] - result["cpu_s"]) / result["update_s"]
            result |= {  # the other ranks are not other processes' noise
                "cpu_s": summed["cpu_s"],
                "rss_peak_bytes": int(summed["rss_peak_bytes"]),
                "other_cores": max(0.0, others),
                "ranks": dp.world,
            }
    else:
        from benchmarks.learn_trl import run_trl  # lazy: trl is the optional bench extra

        result = run_trl(base, events, settings, epochs=EPOCHS, minibatch=MINIBATCH, max_tokens=MAX_TOKENS)
    return (
        {"rss_peak_bytes": peak_rss()}
        | result
        | {
            "contender": contender,
            "threads": torch.get_num_threads(),
            "event_epochs_per_s": len(events) * EPOCHS / result["update_s"],
            "event_epochs_per_cpu_s": len(events) * EPOCHS / result["cpu_s"],
        }
    )


# --- the parent: subprocesses, table, targets --------------------------------------------------------------


def _spawn(args: list[str], ranks: int = 1) -> dict:
    env = worker_env(TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    argv = worker_argv("learn", *args)
    if ranks > 1:  # torchrun, one thread per rank (its default with several ranks, made explicit)
        env |= {"OMP_NUM_THREADS": "1", "THUMBTUNE_NUM_THREADS": "1"}
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}"]
        argv = [*torchrun, "--master-addr=127.0.0.1", f"--master-port={free_port()}", *argv[1:]]
    proc = subprocess.run(
        argv,
        env=env,
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise RuntimeError(f"{' '.join(args[:2])} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def check_contenders(only: list[str] | None) -> None:
    """A ValueError unless ``only`` (None: all) names known contenders, ours among them (the report compares
    every contender with ours)."""
    if only is not None and ("ours" not in only or not set(only) <= set(CONTENDERS)):
        raise ValueError(f"choose from {', '.join(CONTENDERS)}, ours included; got {', '.join(only)}")


def run(
    settings: Settings,
    out: Path | None = None,
    repeats: int = 3,
    with_trl: bool = True,
    only: list[str] | None = None,
) -> dict:
    console = Console() if sys.stdout.isatty() else Console(width=120)
    started = time.perf_counter()
    have_trl = with_trl and importlib.util.find_spec("trl") is not None
    have_fast_bf16 = cpu_has_fast_bf16()
    check_contenders(only)
    contenders = [c for c in CONTENDERS if (c != "trl" or have_trl) and (c != "ours-bf16" or have_fast_bf16)]
    contenders = [c for c in contenders if only is None or c in only]
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
                args = ["worker", contender, "--events", str(events_path)]
                if contender in ("ours", "ours-2ranks"):  # their weights, for the gap between them
                    args += ["--params", str(Path(tmp) / f"params-{contender}-{r}.pt")]
                res = _spawn(args, ranks=RANKS if contender == "ours-2ranks" else 1)
                runs[contender].append(res)
                console.print(
                    f"  run {r + 1}/{repeats} {contender:>5}: {res['update_s']:6.1f} s "
                    f"(CPU {res['cpu_s']:.0f} s) = {res['event_epochs_per_s']:.2f} event-epochs/s, "
                    f"peak RSS {res['rss_peak_bytes'] / 2**30:.2f} GiB, other processes "
                    f"{res['other_cores']:.2f} cores"
                )
        for r, res in enumerate(runs.get("ours-2ranks", [])):  # both contenders of run r are done now
            res["max_weight_diff_vs_ours"] = _weight_gap(Path(tmp), r)
    elapsed = time.perf_counter() - started
    result = report(console, runs, info, have_trl, with_trl, repeats, elapsed, DESCRIPTIONS, CONFIG)
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
        console.print(f"wrote {out}")
    return result


def _weight_gap(tmp: Path, run: int) -> float | None:
    """max |w_2ranks - w_ours| over every trained weight after the same update, or None without ours."""
    ours, two = tmp / f"params-ours-{run}.pt", tmp / f"params-ours-2ranks-{run}.pt"
    if not ours.exists() or not two.exists():
        return None
    pairs = zip(torch.load(ours), torch.load(two), strict=True)
    return max((a - b).abs().max().item() for a, b in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("events")
    ev.add_argument("--out", type=Path, required=True)
    wk = sub.add_parser("worker")
    wk.add_argument("contender", choices=CONTENDERS)
    wk.add_argument("--events", type=Path, required=True)
    wk.add_argument("--params", type=Path, default=None)
    args = parser.parse_args()
    if args.cmd == "events":
        result = make_events(bench_settings(Settings()), args.out)
    else:
        result = worker(args.contender, args.events, args.params)
    if result is not None:  # None: a rank other than 0
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
