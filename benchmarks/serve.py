"""`thumbtune bench serve`: thumbtune vs a naive server vs the raw batched-decode ceiling.

One run on the configured model (default: the embedded SmolLM2-135M-Instruct):
1. ceiling: batched greedy decode with no server (benchmarks.naive, own process);
2. thumbtune: the real server (`thumbtune serve`) in a subprocess at 1, 4 and 16 concurrent clients,
   then ~300 sequential ratings on /v1/feedback (Kafka points at a closed port: events are spooled);
3. naive: a one-request-at-a-time HF ``generate`` server (bench_naive), same client load.
Servers run one at a time. Requests are non-streaming greedy chat completions of prompts from one
fixed list with a fixed max_tokens; tokens/s counts usage.completion_tokens (both servers get the
same prompts and greedy decoding, so the same answers). Latency is per request, client side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.common import CpuNoise, proc_status, worker_argv, worker_env
from benchmarks.prompts import SERVE as PROMPTS
from thumbtune.cli.process import ChildProcess, free_port
from thumbtune.core.settings import Settings

LEVELS = (1, 4, 16)
FEEDBACK_RATINGS = 300
FEEDBACK_WARMUP = 5
NAIVE_LEVEL_BUDGET_S = 90.0  # a naive level sends fewer requests past this (same work per request)
READY_TIMEOUT_S = 300.0
TARGETS = {"vs_naive_16": 3.0, "vs_ceiling_16": 0.70, "rss_gib": 1.5, "feedback_p99_ms": 5.0}

console = Console()
THUMBTUNE_SERVE = [sys.executable, "-m", "thumbtune.cli", "serve"]


class ServerProcess(ChildProcess):
    """A server on 127.0.0.1:port, its output in ``log_dir``: started, awaited on /readyz, stopped with
    SIGINT (uvicorn's graceful shutdown)."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict[str, str], log_dir: Path) -> None:
        super().__init__(name, argv, env=env, log=log_dir / f"{name}.log")
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self) -> float:
        t0 = time.perf_counter()
        self.wait_http(self.url + "/readyz", READY_TIMEOUT_S)
        return time.perf_counter() - t0

    def stop(self, grace: float = 20.0, first: int = signal.SIGINT) -> int | None:
        return super().stop(grace, first)


@dataclass
class LevelResult:
    server: str
    clients: int
    requests: int
    completion_tokens: int
    wall_s: float
    tok_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    other_cores: float
    """CPU other processes used meanwhile, in cores: noise (this machine has os.cpu_count())."""
    answers: dict[int, str] = field(default_factory=dict, repr=False)
    response_ids: list[str] = field(default_factory=list, repr=False)

    def row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("answers", "response_ids")}


def percentile(values: list[float], q: float) -> float:
    """Linearly interpolated (numpy's default); nan for no values."""
    return float(np.percentile(values, q)) if values else float("nan")


def chat_body(prompt_index: int, max_tokens: int) -> dict:
    message = {"role": "user", "content": PROMPTS[prompt_index % len(PROMPTS)]}
    return {"model": "thumbtune", "messages": [message], "max_tokens": max_tokens, "temperature": 0}


async def run_level(
    server: ServerProcess, clients: int, per_client: int, max_tokens: int, budget_s: float | None = None
) -> LevelResult:
    """`clients` concurrent clients, each sending `per_client` requests back to back (closed loop);
    past `budget_s` a client sends no further request (each still sends one)."""
    latencies: list[float] = []
    tokens = errors = 0
    answers: dict[int, str] = {}
    rids: list[str] = []

    async def client(http: httpx.AsyncClient, c: int) -> None:
        nonlocal tokens, errors
        for j in range(per_client):
            if j and budget_s and time.perf_counter() - t0 > budget_s:
                break
            index = (c * per_client + j) % len(PROMPTS)
            sent = time.perf_counter()
            try:
                r = await http.post(server.url + "/v1/chat/completions", json=chat_body(index, max_tokens))
                r.raise_for_status()
            except httpx.HTTPError as exc:
                errors += 1
                console.print(f"[red]{server.name}: request failed: {exc!r}")
                continue
            latencies.append(time.perf_counter() - sent)
            body = r.json()
            tokens += body["usage"]["completion_tokens"]
            answers.setdefault(index, body["choices"][0]["message"]["content"])
            if rid := body["choices"][0].get("response_id"):
                rids.append(rid)

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=900, limits=limits) as http:
        t0, noise = time.perf_counter(), CpuNoise(server.pid)
        await asyncio.gather(*(client(http, c) for c in range(clients)))
        wall = time.perf_counter() - t0
    return LevelResult(
        server.name,
        clients,
        len(latencies),
        tokens,
        wall,
        tokens / wall if wall else 0.0,
        percentile(latencies, 50) * 1000,
        percentile(latencies, 99) * 1000,
        errors,
        noise.cores(),
        answers,
        rids,
    )


async def feedback_bench(url: str, response_ids: list[str], n: int) -> dict:
    """Sequential ratings from one client, each on a distinct answer; cheap 1-token answers top up the ids."""
    ids = list(dict.fromkeys(response_ids))
    async with httpx.AsyncClient(timeout=60) as http:
        missing = n + FEEDBACK_WARMUP - len(ids)
        if missing > 0:
            sem = asyncio.Semaphore(16)

            async def cheap(i: int) -> None:
                async with sem:
                    r = await http.post(url + "/v1/chat/completions", json=chat_body(i, 1))
                    r.raise_for_status()
                    ids.append(r.json()["choices"][0]["response_id"])

            await asyncio.gather(*(cheap(i) for i in range(missing)))
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        for k, rid in enumerate(ids[: n + FEEDBACK_WARMUP]):
            t0 = time.perf_counter()
            rating = {"response_id": rid, "thumb": "up" if k % 2 else "down"}
            r = await http.post(url + "/v1/feedback", json=rating)
            latencies.append(time.perf_counter() - t0)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        latencies = latencies[FEEDBACK_WARMUP:]
        ready = (await http.get(url + "/readyz")).json()
    return {
        "ratings": len(latencies),
        "warmup": FEEDBACK_WARMUP,
        "statuses": statuses,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies) * 1000 if latencies else float("nan"),
        "broker_up": ready.get("broker"),
        "spool_depth": ready.get("spool_depth"),
    }


def _base_env(settings: Settings) -> dict[str, str]:
    return worker_env(
        THUMBTUNE_MODEL=settings.model,
        THUMBTUNE_CACHE_DIR=str(settings.cache_dir),
        THUMBTUNE_DTYPE=settings.dtype,
        THUMBTUNE_NUM_THREADS=str(settings.num_threads),
    )


def measure_ceiling(settings: Settings, max_tokens: int) -> dict:
    argv = worker_argv(
        "naive", "ceiling", "--max-tokens", str(max_tokens), "--batches", "1,16", "--repeats", "2"
    )
    noise = CpuNoise()
    proc = subprocess.run(
        argv, check=False, env=_base_env(settings), capture_output=True, text=True, timeout=900
    )
    for line in proc.stdout.splitlines():
        if line.startswith("CEILING "):
            return json.loads(line[len("CEILING ") :]) | {"other_cores": noise.cores()}
    raise RuntimeError(f"ceiling run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def bench_server(server: ServerProcess, requests_per_client: int, max_tokens: int, *, naive: bool) -> dict:
    console.print(f"[bold]{server.name}[/]: starting ({' '.join(server.argv[1:])}) ...")
    server.start()
    ready_s = server.wait_ready()
    console.print(f"  ready in {ready_s:.1f} s; warming up")
    asyncio.run(run_level(server, 2, 1, max_tokens))  # warm-up (batched path included), not counted
    levels: list[LevelResult] = []
    service_s = None
    for clients in LEVELS:
        per_client = requests_per_client
        if naive and service_s:  # keep the naive run bounded: fewer requests, same work per request
            per_client = max(1, min(per_client, int(NAIVE_LEVEL_BUDGET_S / (service_s * clients))))
        budget = NAIVE_LEVEL_BUDGET_S if naive else None
        res = asyncio.run(run_level(server, clients, per_client, max_tokens, budget))
        if clients == 1:
            service_s = res.wall_s / max(res.requests, 1)
        console.print(
            f"  {clients:>2} clients: {res.requests} requests, {res.completion_tokens} tokens in "
            f"{res.wall_s:.1f} s = {res.tok_s:.1f} tok/s, p50 {res.p50_ms:.0f} ms, "
            f"p99 {res.p99_ms:.0f} ms (other processes: {res.other_cores:.2f} cores)"
        )
        levels.append(res)
    feedback = None
    if not naive:
        ids = [rid for lv in levels for rid in lv.response_ids]
        feedback = asyncio.run(feedback_bench(server.url, ids, FEEDBACK_RATINGS))
        console.print(
            f"  feedback: {feedback['ratings']} ratings, p50 {feedback['p50_ms']:.2f} ms, "
            f"p99 {feedback['p99_ms']:.2f} ms, statuses {feedback['statuses']}"
        )
    hwm = proc_status(server.pid, "VmHWM") or 0  # the kernel's peak RSS of the server process
    server.stop()
    return {"ready_s": ready_s, "levels": levels, "rss_peak_bytes": hwm, "feedback": feedback}


def report(ceiling: dict, tt: dict, naive: dict, max_tokens: int, elapsed: float) -> dict:
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
    for name, res in (("thumbtune", tt), ("naive", naive)):
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
    noisy = max([ceiling["other_cores"]] + [lv.other_cores for r in (tt, naive) for lv in r["levels"]])
    if noisy > 0.15:
        console.print(
            f"[yellow]warning: other processes kept up to {noisy:.2f} of this machine's "
            f"{os.cpu_count()} cores busy (column 'other CPU'): those figures are noisy; "
            "rerun when the machine is idle"
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

    targets = Table(title="targets")
    for col in ("check", "measured", "target", ""):
        targets.add_column(col)
    checks = [
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
    for name, measured, target, ok in checks:
        targets.add_row(name, measured, target, "[green]PASS[/]" if ok else "[red]MISS[/]")
    console.print(targets)
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
        "ratios": {
            "vs_naive": {str(c): v for c, v in vs_naive.items()},
            "vs_ceiling_16": vs_ceiling,
            "vs_ceiling_decode_only_16": vs_decode_only,
            "identical_answers": [sum(same), len(same)],
        },
        "targets": {name: {"measured": m, "target": t, "pass": ok} for name, m, t, ok in checks},
    }


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(
    settings: Settings, out: Path | None = None, requests_per_client: int = 4, max_tokens: int = 64
) -> dict:
    started = time.perf_counter()
    previous = None
    with contextlib.suppress(ValueError):  # only the main thread may set handlers
        previous = signal.signal(signal.SIGTERM, _interrupt)
    servers: list[ServerProcess] = []
    with tempfile.TemporaryDirectory(prefix="thumbtune-bench-") as tmp:
        try:
            console.print(f"[bold]ceiling[/]: batched greedy decode, no server, {max_tokens} steps ...")
            ceiling = measure_ceiling(settings, max_tokens)
            for batch, r in ceiling["runs"].items():
                console.print(
                    f"  batch {batch}: {r['tok_s']:.1f} tok/s ({r['decode_only_tok_s']:.1f} decode-only)"
                )
            env, port = _base_env(settings), free_port()
            env.update(
                {
                    "THUMBTUNE_HOST": "127.0.0.1",
                    "THUMBTUNE_PORT": str(port),  # Kafka: a closed port
                    "THUMBTUNE_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
                    "THUMBTUNE_SPOOL_DIR": str(Path(tmp) / "spool"),
                    "THUMBTUNE_LOG_LEVEL": "warning",
                    "THUMBTUNE_REDIS_URL": "",
                    "THUMBTUNE_API_KEYS": "",
                }
            )
            servers = [ServerProcess("thumbtune", THUMBTUNE_SERVE, port, env, Path(tmp))]
            tt = bench_server(
                servers[-1],
                requests_per_client,
                max_tokens,
                naive=False,
            )
            port = free_port()
            argv = worker_argv("naive", "serve", "--port", str(port))
            servers.append(ServerProcess("naive", argv, port, _base_env(settings), Path(tmp)))
            naive = bench_server(
                servers[-1],
                requests_per_client,
                max_tokens,
                naive=True,
            )
            result = report(ceiling, tt, naive, max_tokens, time.perf_counter() - started)
        finally:
            for server in servers:  # before the temp dir (logs, spool) goes; a stopped one is a no-op
                server.stop()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
        console.print(f"wrote {out}")
    return result
