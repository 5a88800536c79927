"""The report of `thumbtune bench learn` (benchmarks/learn.py): the table of medians, targets, notes."""

from __future__ import annotations

import statistics

from rich.console import Console
from rich.table import Table

from benchmarks.report import print_targets, warn_if_noisy
from learner.policy import cpu_has_fast_bf16

TARGETS = {"vs_trl": 1.3, "vs_floor": 0.75, "rss_gib": 3.0}


def report(
    console: Console,
    runs: dict[str, list[dict]],
    info: dict,
    have_trl: bool,
    asked_trl: bool,
    repeats: int,
    elapsed: float,
    descriptions: dict[str, str],
    config: dict,
) -> dict:
    """Print the contenders' table, what each does, the targets; return everything as one dict."""
    epochs, minibatch, lora = config["epochs"], config["minibatch"], config["lora"]

    def median(c: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[c])

    med = {
        c: {k: median(c, k) for k in ("event_epochs_per_s", "event_epochs_per_cpu_s", "update_s", "cpu_s")}
        | {"rss_peak_bytes": max(r["rss_peak_bytes"] for r in runs[c])}
        for c in runs
    }
    table = Table(
        title=f"thumbtune bench learn: {info['events']} events x {epochs} epochs, minibatch "
        f"{minibatch}, LoRA r={lora['r']} on {','.join(lora['target_modules'])}, CPU, "
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
    for name, text in descriptions.items():
        console.print(f"  {name:>5}: {text}")
    pt, at = info["prompt_tokens"], info["answer_tokens"]
    console.print(
        f"events: prompts {pt['min']}-{pt['max']} tokens (mean {pt['mean']:.1f}), answers "
        f"{at['min']}-{at['max']} (mean {at['mean']:.1f}, {info['stopped_at_eos']} stopped at "
        "EOS), +1/-1 per prompt pair; 'per CPU-s' = event-epochs per second of the process's own "
        "CPU time; peak RSS = the largest VmHWM of the contender's runs"
    )
    warn_if_noisy(console, max(r["other_cores"] for rs in runs.values() for r in rs))

    ours = med["ours"]["event_epochs_per_s"]
    vs_floor = ours / med["floor"]["event_epochs_per_s"] if "floor" in med else None
    vs_trl = ours / med["trl"]["event_epochs_per_s"] if "trl" in med else None
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
            f"{vs_floor:.0%}" if vs_floor else "not run",
            f">= {TARGETS['vs_floor']:.0%}",
            None if vs_floor is None else vs_floor >= TARGETS["vs_floor"],
        ),
        (
            "ours peak RSS (VmHWM)",
            f"{rss_gib:.2f} GiB",
            f"<= {TARGETS['rss_gib']:.0f} GiB",
            rss_gib <= TARGETS["rss_gib"],
        ),
    ]
    targets = print_targets(console, checks)
    if "ours-bf16" in med:
        bf16_speedup = med["ours-bf16"]["event_epochs_per_s"] / ours
        console.print(
            f"bf16 autocast (precision 'auto' on this CPU): {bf16_speedup:.2f}x ours in float32, "
            f"peak RSS {med['ours-bf16']['rss_peak_bytes'] / 2**30:.2f} GiB"
        )
    else:
        bf16_speedup = None
        console.print(
            "ours-bf16 not run: not among --contenders"
            if cpu_has_fast_bf16()
            else "ours-bf16 not run: this CPU has neither AMX nor AVX512-BF16, so precision 'auto' is float32"
        )
    speedup = gap = None
    if "ours-2ranks" in med:
        two, runs_2 = med["ours-2ranks"], runs["ours-2ranks"]
        speedup = med["ours"]["update_s"] / two["update_s"]
        gaps = [r["max_weight_diff_vs_ours"] for r in runs_2 if r.get("max_weight_diff_vs_ours") is not None]
        gap = max(gaps) if gaps else None
        console.print(
            f"data parallelism: 2 ranks of 1 thread {two['update_s']:.1f} s, ours "
            f"{med['ours']['update_s']:.1f} s = {speedup:.2f}x ours' speed; peak RSS "
            f"{two['rss_peak_bytes'] / 2**30:.2f} GiB over both ranks; "
            + (
                f"weights after the update within {gap:.2e} of ours"
                if gap is not None
                else "weights not compared"
            )
        )
    if not have_trl:
        why = "trl is not installed (pip install 'thumbtune[bench]')" if asked_trl else "--no-trl"
        console.print(f"TRL not measured: {why}")
    console.print(f"whole bench {elapsed:.0f} s (events sampled in {info['sample_s']:.0f} s)")
    return {
        "events": info,
        **config,
        "repeats": repeats,
        "elapsed_s": elapsed,
        "contenders": descriptions,
        "runs": runs,
        "medians": med,
        "ratios": {"ours_vs_trl": vs_trl, "ours_vs_floor": vs_floor, "bf16_vs_float32": bf16_speedup}
        | {"two_ranks_vs_ours": speedup, "two_ranks_max_weight_diff": gap},
        "targets": targets,
    }
