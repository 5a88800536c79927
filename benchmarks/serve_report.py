"""The report of `thumbtune bench serve` (benchmarks/serve.py): the table, the ratios, the targets."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from benchmarks.prompts import SERVE as PROMPTS
from benchmarks.report import print_targets, warn_if_noisy

LEVELS = (1, 4, 16)
"""Concurrent clients of each level."""
NAIVE_LEVEL_BUDGET_S = 90.0
"""A naive level sends fewer requests past this (same work per request)."""
TARGETS = {
    "vs_naive_1": 1.0,
    "vs_naive_16": 3.0,
    "vs_ceiling_16": 0.70,
    "rss_gib": 1.5,
    "feedback_p99_ms": 5.0,
    "front_vs_vllm_16": 0.90,
}

console = Console()


def report(ceiling: dict, tt: dict, naive: dict, vllm: dict, max_tokens: int, elapsed: float) -> dict:
    table = Table(title=f"thumbtune bench serve: greedy chat completions, max_tokens={max_tokens}")
    for col in (
        "server",
        "clients",
        "requests",
        "tokens",
        "wall s",
        "tok/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "other CPU",
    ):
        table.add_column(col, justify="left" if col == "server" else "right")
    servers = [("thumbtune", tt), ("naive", naive)]
    if "skipped" not in vllm:
        servers += [("vllm", vllm["vllm"]), ("thumbtune+vllm", vllm["thumbtune+vllm"])]
    for name, res in servers:
        for lv in res["levels"]:
            table.add_row(
                name,
                str(lv.clients),
                str(lv.requests),
                str(lv.completion_tokens),
                f"{lv.wall_s:.1f}",
                f"{lv.tok_s:.1f}",
                f"{lv.p50_ms:.0f}",
                f"{lv.p99_ms:.0f}",
                str(lv.errors),
                f"{lv.other_cores:.2f}",
            )
        table.add_section()
    for batch, c in ceiling["runs"].items():
        table.add_row(
            f"ceiling (batch {batch}, no server)",
            batch,
            "-",
            str(c["batch"] * c["steps"]),
            f"{c['prefill_s'] + c['decode_s']:.1f}",
            f"{c['tok_s']:.1f}",
            "-",
            "-",
            "-",
            f"{ceiling['other_cores']:.2f}",
        )
    console.print(table)
    warn_if_noisy(
        console, max([ceiling["other_cores"]] + [lv.other_cores for _, r in servers for lv in r["levels"]])
    )

    tt16 = {lv.clients: lv for lv in tt["levels"]}
    nv16 = {lv.clients: lv for lv in naive["levels"]}
    ceil16 = ceiling["runs"]["16"]
    vs_naive = {c: tt16[c].tok_s / nv16[c].tok_s if nv16[c].tok_s else float("inf") for c in LEVELS}
    vs_ceiling = tt16[16].tok_s / ceil16["tok_s"]
    vs_decode_only = tt16[16].tok_s / (ceil16["decode_only_tok_s"] or float("nan"))
    rss_gib = tt["rss_peak_bytes"] / 2**30
    fb = tt["feedback"]
    same = [
        tt16[c].answers[i] == nv16[c].answers[i]
        for c in LEVELS
        for i in nv16[c].answers
        if i in tt16[c].answers
    ]

    console.print(
        f"ceiling decode-only (prefill excluded), batch 16: {ceil16['decode_only_tok_s']:.1f} "
        f"tok/s; batch 1: {ceiling['runs']['1']['tok_s']:.1f} tok/s; "
        f"torch threads {ceiling['threads']}"
    )
    console.print("thumbtune / naive tok/s: " + ", ".join(f"{c} clients {vs_naive[c]:.2f}x" for c in LEVELS))
    console.print(
        f"identical greedy answers, thumbtune vs naive (same prompt and level): {sum(same)}/{len(same)}"
    )
    console.print(
        f"feedback: broker unreachable on purpose (broker_up={fb['broker_up']}), events spooled "
        f"on disk (spool depth {fb['spool_depth']}); statuses {fb['statuses']}; "
        f"{fb['warmup']} warm-up ratings not counted; max {fb['max_ms']:.2f} ms"
    )
    if any(lv.requests < nv16[1].requests * lv.clients for lv in naive["levels"][1:]):
        console.print(
            f"note: naive levels capped at ~{NAIVE_LEVEL_BUDGET_S:.0f} s of requests (fewer "
            "requests per client, same work each; tok/s is a rate; naive p50/p99 at high "
            "concurrency are then optimistic, since the queue never reaches steady state)"
        )

    checks = [
        (
            "thumbtune / naive, 1 client",
            f"{vs_naive[1]:.2f}x",
            f">= {TARGETS['vs_naive_1']:.1f}x",
            vs_naive[1] >= TARGETS["vs_naive_1"],
        ),
        (
            "thumbtune / naive, 16 clients",
            f"{vs_naive[16]:.2f}x",
            f">= {TARGETS['vs_naive_16']:.0f}x",
            vs_naive[16] >= TARGETS["vs_naive_16"],
        ),
        (
            "thumbtune / ceiling (batch 16), 16 clients",
            f"{vs_ceiling:.0%} (decode-only {vs_decode_only:.0%})",
            f">= {TARGETS['vs_ceiling_16']:.0%}",
            vs_ceiling >= TARGETS["vs_ceiling_16"],
        ),
        (
            "thumbtune server peak RSS (VmHWM)",
            f"{rss_gib:.2f} GiB",
            f"<= {TARGETS['rss_gib']} GiB",
            rss_gib <= TARGETS["rss_gib"],
        ),
        (
            "feedback p99 (p50)",
            f"{fb['p99_ms']:.2f} ms ({fb['p50_ms']:.2f} ms)",
            f"<= {TARGETS['feedback_p99_ms']:.0f} ms",
            fb["p99_ms"] <= TARGETS["feedback_p99_ms"] and set(fb["statuses"]) == {202},
        ),
    ]
    front = vllm_ratios(vllm)
    if front is not None:
        checks.append(
            (
                "thumbtune+vllm / vllm, 16 clients",
                f"{front[16]:.2f}x",
                f">= {TARGETS['front_vs_vllm_16']:.2f}x",
                front[16] >= TARGETS["front_vs_vllm_16"],
            )
        )
    targets = print_targets(console, checks)
    console.print(
        f"naive server peak RSS {naive['rss_peak_bytes'] / 2**30:.2f} GiB; whole bench {elapsed:.0f} s"
    )

    return {
        "max_tokens": max_tokens,
        "levels": list(LEVELS),
        "prompts": PROMPTS,
        "elapsed_s": elapsed,
        "thumbtune": {
            "ready_s": tt["ready_s"],
            "levels": [lv.row() for lv in tt["levels"]],
            "rss_peak_bytes": tt["rss_peak_bytes"],
            "feedback": fb,
        },
        "naive": {
            "ready_s": naive["ready_s"],
            "levels": [lv.row() for lv in naive["levels"]],
            "rss_peak_bytes": naive["rss_peak_bytes"],
        },
        "ceiling": ceiling,
        "vllm": vllm_json(vllm),
        "ratios": {
            "front_vs_vllm": {str(c): v for c, v in front.items()} if front is not None else None,
            "vs_naive": {str(c): v for c, v in vs_naive.items()},
            "vs_ceiling_16": vs_ceiling,
            "vs_ceiling_decode_only_16": vs_decode_only,
            "identical_answers": [sum(same), len(same)],
        },
        "targets": targets,
    }


def vllm_ratios(vllm: dict) -> dict[int, float] | None:
    """thumbtune+vllm / vllm tok/s per level, printed with the mismatch; None when vLLM did not run."""
    if "skipped" in vllm:
        console.print(f"[bold red]vLLM contenders skipped: {vllm['skipped']}[/]")
        return None
    direct = {lv.clients: lv for lv in vllm["vllm"]["levels"]}
    front = {lv.clients: lv for lv in vllm["thumbtune+vllm"]["levels"]}
    ratios = {c: front[c].tok_s / direct[c].tok_s if direct[c].tok_s else float("nan") for c in LEVELS}
    console.print(
        "thumbtune+vllm / vllm tok/s: " + ", ".join(f"{c} clients {ratios[c]:.2f}x" for c in LEVELS)
    )
    same = [
        front[c].answers[i] == direct[c].answers[i]
        for c in LEVELS
        for i in direct[c].answers
        if i in front[c].answers
    ]
    console.print(f"identical greedy answers, thumbtune+vllm vs vllm: {sum(same)}/{len(same)}")
    table = Table(title="|log pi_vllm - log pi_learner| on vLLM's own samples (top_p = 1)")
    for col in ("temperature", "learner precision", "tokens", "mean", "p99", "max"):
        table.add_column(col, justify="right")
    for row in vllm["mismatch"].values():
        table.add_row(
            f"{row['temperature']}",
            row["learner_precision"],
            str(row["tokens"]),
            f"{row['mean']:.2e}",
            f"{row['p99']:.2e}",
            f"{row['max']:.2e}",
        )
    console.print(table)
    console.print(
        f"peak RSS: vllm {vllm['vllm']['rss_peak_bytes'] / 2**30:.2f} GiB (API server + engine core), "
        f"thumbtune in front of it {vllm['thumbtune+vllm']['rss_peak_bytes'] / 2**30:.2f} GiB (its own copy "
        "of the model, for the checks)"
    )
    return ratios


def vllm_json(vllm: dict) -> dict:
    if "skipped" in vllm:
        return vllm
    return {
        name: {
            "ready_s": vllm[name]["ready_s"],
            "levels": [lv.row() for lv in vllm[name]["levels"]],
            "rss_peak_bytes": vllm[name]["rss_peak_bytes"],
        }
        for name in ("vllm", "thumbtune+vllm")
    } | {"mismatch": vllm["mismatch"]}
