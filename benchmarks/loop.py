"""`thumbtune bench loop`: does the deployed model get better from its users' thumbs, and how fast?

1. Starts the embedded system (`thumbtune up`: broker, server, learner) with a fresh adapter store under
   --out, or uses a running one (--url, with --adapter-store where its learner writes).
2. Simulated users (`thumbtune.cli.simulate`) chat and rate by the rule until --thumbs ratings are in.
   The learner trains a version per batch; the server hot-swaps each one.
3. Every version in the store (and the base, v0) is evaluated offline (`benchmarks.evaluate`) on
   held-out prompts no simulated user ever sent: approval under the rule, mean words, KL to the base,
   and the capability probe.
4. Writes DIR/results.json, DIR/learning.png and DIR/ratings.jsonl, and prints the summary.

feedback_to_live_s of a version: from the rating, among those it trained on, that the server accepted
last (so the one that completed its batch) to the first chat request answered by that version or a later
one (the time that request was sent, at most one request gap late: users keep chatting throughout).
Versions trained on the learner's own answers alone between human batches (refine_rounds) have the
ratings of their parent and no feedback_to_live_s; the version evaluated for a number of ratings is the
last one trained before the next human batch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import machine
from benchmarks.evaluate import Evaluator, activate_version
from benchmarks.system import EmbeddedSystem
from learner.config import LearnerSettings
from thumbtune.cli.rules import Rule, load_rule
from thumbtune.cli.simulate import Report, Simulator, load_prompts, progress_printer
from thumbtune.core.base_model import load_base
from thumbtune.core.contract import BASE_VERSION, AdapterManifest
from thumbtune.core.settings import Settings
from thumbtune.core.store import LocalAdapterStore

TARGET_APPROVAL = 0.8


def _median_of(rows: list[dict], diagnostic: str) -> float | None:
    """The median of one manifest diagnostic over the versions that have it."""
    values = [r["diagnostics"][diagnostic] for r in rows if diagnostic in r["diagnostics"]]
    return round(statistics.median(values), 3) if values else None


def _manifests(store: Path) -> list[AdapterManifest]:
    """Every complete version's manifest, oldest first."""
    versions = LocalAdapterStore(store)
    return [versions.read_manifest(v) for v in versions.versions()]


def served_by_quarter(report: Report) -> list[float | None]:
    """The rule's approval of the answers users were served (whatever version served them), per quarter of
    the run's ratings in the order they were made: what the users got, where `approval` is what the
    learner's versions would give."""
    ratings = report.ratings
    quarters = [ratings[len(ratings) * q // 4 : len(ratings) * (q + 1) // 4] for q in range(4)]
    verdicts = [[a for r in quarter for a in r.approved] for quarter in quarters]
    return [round(sum(v) / len(v), 3) if v else None for v in verdicts]


def wait_for_trained(store: Path, events_sent: int, batch_size: int, timeout_s: float) -> None:
    """Give the learner time to write the version whose batch the last ratings completed."""
    expected = (events_sent // batch_size) * batch_size
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sum(m.event_count for m in _manifests(store)) >= expected:
            return
        time.sleep(2)
    print(f"[bench loop] the learner had not trained {expected} events within {timeout_s:.0f} s", flush=True)


def version_rows(report: Report, manifests: list[AdapterManifest], started_at: float) -> list[dict]:
    """Per version: ratings trained on so far, when it was written, first answered, feedback-to-live."""
    rating_of_event = {e: i for i, r in enumerate(report.ratings) for e in r.event_ids}
    first_answer: dict[str, float] = {}
    for r in report.ratings:
        first_answer[r.adapter_version] = min(r.sent_at, first_answer.get(r.adapter_version, r.sent_at))
    served = report.by_version()
    rows, trained = [], set()
    for i, m in enumerate(manifests):
        ours = [rating_of_event[e] for e in m.event_ids if e in rating_of_event]
        if not ours and not (rows and m.event_count == 0):
            continue  # a version from before this run (--url against a system with history)
        trained.update(ours)
        last_rating = max(report.ratings[i].rated_at for i in ours) if ours else None
        live_at = min(
            (first_answer[n.version] for n in manifests[i:] if n.version in first_answer), default=None
        )
        rows.append(
            {
                "version": m.version,
                "thumbs": len(trained),
                "events": m.event_count,
                "created_s": round(m.created_at - started_at, 2),
                "live_s": None if live_at is None else round(live_at - started_at, 2),
                "wall_s": round((live_at if live_at is not None else m.created_at) - started_at, 2),
                "feedback_to_live_s": (
                    None if live_at is None or last_rating is None else round(live_at - last_rating, 2)
                ),
                "served_ratings": served.get(m.version, {}).get("ratings", 0),
                "served_approval": served.get(m.version, {}).get("approval"),
                "diagnostics": m.diagnostics,
            }
        )
    return rows


def batch_ends(rows: list[dict]) -> list[dict]:
    """Per human batch, its last version: the one live when the next batch's ratings came in."""
    return [r for i, r in enumerate(rows) if i == len(rows) - 1 or rows[i + 1]["thumbs"] != r["thumbs"]]


def plot(results: dict, path: Path) -> None:
    import matplotlib  # lazy: matplotlib is the optional bench extra (checked at the start of `run`)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above, and after choosing the headless backend

    rows = results["versions"]
    x = [r["thumbs"] for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    ax.plot(x, [r["approval"] for r in rows], "o-", color="tab:blue", label="approval (held-out prompts)")
    of = results["summary"]["capability_of"]
    ax.plot(x, [r["capability"] / of for r in rows], "^-", color="tab:green", label=f"capability (of {of})")
    ax.axhline(TARGET_APPROVAL, ls="--", lw=1, color="tab:blue", alpha=0.5)
    ax.set_xlabel("ratings trained on")
    ax.set_ylabel(f"approval under '{results['config']['rule']}', capability share")
    ax.set_ylim(0, 1)
    kl_ax = ax.twinx()
    kl_ax.plot(x, [r["kl_to_base"] for r in rows], "s-", color="tab:red", label="KL to base")
    kl_ax.set_ylabel("KL(pi || base), nats/token", color="tab:red")
    kl_ax.set_ylim(bottom=0)
    s = results["summary"]
    ax.set_title(
        f"approval {s['baseline_approval']:.0%} -> {s['final_approval']:.0%} in {s['thumbs_used']} "
        f"ratings; capability {s['capability_base']} -> {s['capability_final']}",
        fontsize=10,
    )
    handles = ax.get_legend_handles_labels()[0] + kl_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(
    settings: Settings,
    *,
    rule: str,
    thumbs: int,
    out: Path,
    url: str | None = None,
    adapter_store: str | None = None,
    users: int = 4,
    noise: float = 0.0,
    choice: bool = False,
    rank: int | None = None,
    temperature: float = 1.0,
    max_tokens: int = 48,
    samples_per_prompt: int = 2,
    eval_every: int = 5,
    seed: int = 0,
    signal: str | None = None,
    think_s: float = 0.0,
    refine_rounds: int | None = None,
    canary_share: float | None = None,
) -> dict:
    """One run; ``signal`` and ``refine_rounds`` set the embedded learner's THUMBTUNE_LEARNER_SIGNAL and
    _REFINE_ROUNDS (None: the environment's); ``canary_share``, THUMBTUNE_CANARY_SHARE (the users then come
    as 1,000 distinct `user` ids, so the share can draw them; also with a share of 0, so that a run without
    canaries compares with one with them on the same users)."""
    judge = load_rule(rule)
    overrides = {
        name: value
        for name, value in (("signal", signal), ("refine_rounds", refine_rounds))
        if value is not None
    }
    learner_env = {f"THUMBTUNE_LEARNER_{name.upper()}": str(value) for name, value in overrides.items()}
    if canary_share is not None:
        learner_env["THUMBTUNE_CANARY_SHARE"] = str(canary_share)
    if (overrides or canary_share is not None) and url is not None:
        raise ValueError(
            "--signal, --refine-rounds and --canary-share set the embedded system's; with --url, set them "
            "on the learner and servers you run"
        )
    if importlib.util.find_spec("matplotlib") is None:  # checked now, not after an hour of simulated users
        raise ValueError("bench loop draws learning.png with matplotlib: .venv/bin/pip install -e '.[bench]'")
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "rule": rule,
        "thumbs": thumbs,
        "users": users,
        "noise": noise,
        "choice": choice,
        "rank": rank,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "samples_per_prompt": samples_per_prompt,
        "model": settings.model,
        "learner": LearnerSettings(**overrides).model_dump(mode="json"),
        "url": url or "embedded",
        "eval_every": eval_every,
        "think_s": think_s,
        "canary_share": canary_share or 0.0,
        **machine(),
    }
    sim = Simulator(
        "",
        judge,
        users=users,
        thumbs=thumbs,
        noise=noise,
        choice=choice,
        rank=rank,
        temperature=temperature,
        max_tokens=max_tokens,
        prompts=load_prompts("train"),
        seed=seed,
        think_s=think_s,
        population=1000 if canary_share is not None else None,
        on_rating=progress_printer(50),
    )
    if url is None:
        system = EmbeddedSystem(out, out / "system.log", env=learner_env)
        store = system.store
        print(f"[bench loop] starting the embedded system (log: {out / 'system.log'})", flush=True)
        with system:
            sim.url = system.url
            report = sim.run()
            events_sent = sum(len(r.event_ids) for r in report.ratings)
            wait_for_trained(store, events_sent, LearnerSettings().batch_size, 180)
    else:
        store = Path(adapter_store or settings.adapter_store_path)
        sim.url = url.rstrip("/")
        report = sim.run()
    report.write_jsonl(out / "ratings.jsonl")

    def every_nth(ends: list[dict]) -> list[dict]:
        return [r for i, r in enumerate(ends, 1) if i % eval_every == 0 or i == len(ends)]

    return measure(
        settings,
        report,
        store,
        out,
        config,
        judge=judge,
        choose=every_nth,
        samples_per_prompt=samples_per_prompt,
        temperature=temperature,
        max_tokens=max_tokens,
        seed=seed,
    )


def measure(
    settings: Settings,
    report: Report,
    store: Path,
    out: Path,
    config: dict,
    *,
    judge: Rule,
    choose: Callable[[list[dict]], list[dict]],
    samples_per_prompt: int,
    temperature: float,
    max_tokens: int,
    seed: int,
) -> dict:
    """Steps 3-4: evaluate the base and the versions ``choose`` picks from the human batches' last versions
    (`batch_ends`) on the held-out prompts, write results.json and learning.png, print the summary. The
    ratings in ``report`` are the ones counted: a version's ``thumbs`` are how many of them it trained on."""
    heldout = load_prompts("heldout")
    started_at = report.started_at
    rows = version_rows(report, _manifests(store), started_at)
    start_version = report.ratings[0].adapter_version if report.ratings else BASE_VERSION

    print(
        f"[bench loop] {len(report.ratings)} ratings, {len(rows)} new versions; evaluating some on "
        f"{len(heldout)} held-out prompts x {samples_per_prompt} samples + the capability probe",
        flush=True,
    )
    torch.set_num_threads(os.cpu_count() or 1)  # the system is down: evaluation may use every core
    base = load_base(settings)

    model = None
    evaluated = []
    chosen = choose(batch_ends(rows))
    for row in [{"version": start_version, "thumbs": 0, "wall_s": 0.0, "feedback_to_live_s": None}, *chosen]:
        version = row["version"]
        t0 = time.perf_counter()
        if version != BASE_VERSION:
            model = activate_version(model, base.model, store / version, version)
        evaluator = Evaluator(
            base.model if version == BASE_VERSION else model,
            base.tokenizer,
            heldout,
            judge,
            samples_per_prompt=samples_per_prompt,
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed,
        )
        ev = evaluator.evaluate()
        if model is not None and version != BASE_VERSION:
            previous = [n for n in model.peft_config if n != version]
            for name in previous:
                model.delete_adapter(name)
        row = row | {
            "approval": round(ev.approval, 4),
            "mean_words": round(ev.mean_words, 2),
            "kl_to_base": round(ev.kl_to_base, 5),
            "kl_per_answer": round(ev.kl_per_answer, 4),
            "capability": ev.capability,
            "capability_failed": ev.failed_items,
            "samples": ev.samples,
        }
        evaluated.append(row)
        print(
            f"[bench loop] {version:>5}: {row['thumbs']:>5} ratings  approval {ev.approval:6.1%}  "
            f"words {ev.mean_words:5.1f}  KL {ev.kl_to_base:.4f}/token  capability "
            f"{ev.capability}/{ev.capability_of}  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )

    reached = [r for r in evaluated if r["approval"] >= TARGET_APPROVAL]
    after = evaluated[evaluated.index(reached[0]) :] if reached else []
    to_live = [r["feedback_to_live_s"] for r in rows if r["feedback_to_live_s"] is not None]
    last = next((r["diagnostics"] for r in reversed(rows) if r["events"]), {})  # a refined one fits no model
    summary = {
        "baseline_approval": evaluated[0]["approval"],
        "final_approval": evaluated[-1]["approval"],
        "best_approval": max(r["approval"] for r in evaluated),
        "thumbs_used": evaluated[-1]["thumbs"],
        "ratings_sent": len(report.ratings),
        "thumbs_to_target": reached[0]["thumbs"] if reached else None,
        "wall_s_to_target": reached[0]["wall_s"] if reached else None,
        "min_approval_after_target": min(r["approval"] for r in after) if after else None,
        "target_approval": TARGET_APPROVAL,
        "capability_min": min(r["capability"] for r in evaluated),
        "capability_base": evaluated[0]["capability"],
        "capability_final": evaluated[-1]["capability"],
        "capability_of": len(evaluator.capability_items),
        "baseline_mean_words": evaluated[0]["mean_words"],
        "final_mean_words": evaluated[-1]["mean_words"],
        "kl_to_base_final": evaluated[-1]["kl_to_base"],
        "feedback_to_live_s": statistics.median(to_live) if to_live else None,
        "update_s_median": _median_of(rows, "update_s"),
        "rollout_sample_s_median": _median_of(rows, "rollout.sample_s"),
        "reward_model_run_accuracy": last.get("reward_model.run_accuracy"),
        "reward_model_share_median": _median_of(rows, "signal.reward_model_share"),
        "feedback_to_live_s_max": max(to_live) if to_live else None,
        "versions": len(rows),
        "refine_versions": sum(1 for r in rows if r["events"] == 0),
        "versions_seen_live": len(to_live),
        "ratings_untrained": len(report.ratings) - evaluated[-1]["thumbs"],
        "served_approval_by_quarter": served_by_quarter(report),
        "loop_wall_s": round(report.finished_at - report.started_at, 1),
        "request_errors": dict(report.errors),
    }
    results = {"config": config, "summary": summary, "versions": evaluated, "all_versions": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "learning.png")
    print(json.dumps(summary, indent=2))
    print(f"[bench loop] wrote {out / 'results.json'} and {out / 'learning.png'}")
    return results
