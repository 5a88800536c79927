"""`thumbtune bench serve`: thumbtune vs a naive server vs the raw batched-decode ceiling, and through vLLM.

One run on the configured model (default: the embedded SmolLM2-135M-Instruct):
1. ceiling: batched greedy decode with no server (benchmarks.naive, own process);
2. thumbtune: the real server (`thumbtune serve`) in a subprocess at 1, 4 and 16 concurrent clients,
   then ~300 sequential ratings on /v1/feedback (Kafka points at a closed port: events are spooled);
3. naive: a one-request-at-a-time HF ``generate`` server (bench_naive), same client load;
4. with vLLM installed (`make install-vllm`; --no-vllm skips it): vllm, the vLLM server `thumbtune vllm`
   starts, asked directly; thumbtune+vllm, `thumbtune serve` with THUMBTUNE_ENGINE=vllm in front of that
   same vLLM server (the loop's cost); then the log-prob mismatch of vLLM's answers against the learner's
   forward pass (benchmarks/serve_vllm.py).
Servers run one at a time (vLLM stays up under thumbtune+vllm, which generates through it). Requests are
non-streaming greedy chat completions of prompts from one fixed list with a fixed max_tokens; tokens/s counts
usage.completion_tokens (all servers get the same prompts and greedy decoding, so the same answers).
Latency is per request, client side. The thumbtune server, the naive server and the ceiling allocate with
one malloc, the server's (THUMBTUNE_ALLOCATOR: jemalloc where installed); vLLM with its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import CpuNoise, proc_status, process_tree, worker_argv, worker_env
from benchmarks.prompts import SERVE as PROMPTS
from benchmarks.serve_report import LEVELS, NAIVE_LEVEL_BUDGET_S, console, report
from benchmarks.serve_vllm import logprob_mismatch
from thumbtune.cli.process import ChildProcess, free_port
from thumbtune.cli.vllm import VLLMNotInstalled, vllm_command, vllm_python
from thumbtune.core.base_model import resolve
from thumbtune.core.malloc import find_jemalloc, jemalloc_env
from thumbtune.core.settings import Settings

FEEDBACK_RATINGS = 300
FEEDBACK_WARMUP = 5
READY_TIMEOUT_S = 300.0
THUMBTUNE_SERVE = [sys.executable, "-m", "thumbtune.cli", "serve"]


class ServerProcess(ChildProcess):
    """A server on 127.0.0.1:port, its output in ``log_dir``: started, awaited on /readyz, stopped with
    SIGINT (uvicorn's graceful shutdown)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        env: dict[str, str],
        log_dir: Path,
        *,
        ready_path: str = "/readyz",
        model: str = "thumbtune",
        behind: ServerProcess | None = None,
    ) -> None:
        super().__init__(name, argv, env=env, log=log_dir / f"{name}.log")
        self.url = f"http://127.0.0.1:{port}"
        self.ready_path, self.model = ready_path, model
        self.behind = behind
        """The server this one generates through (thumbtune+vllm: vLLM), counted as part of it."""

    def pids(self) -> list[int]:
        """Its processes (and those of the server behind it): their CPU is the contender's, not noise."""
        mine = process_tree(self.pid) if self.pid else []
        return mine + (self.behind.pids() if self.behind is not None else [])

    def wait_ready(self) -> float:
        t0 = time.perf_counter()
        self.wait_http(self.url + self.ready_path, READY_TIMEOUT_S)
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


def chat_body(prompt_index: int, max_tokens: int, model: str = "thumbtune") -> dict:
    message = {"role": "user", "content": PROMPTS[prompt_index % len(PROMPTS)]}
    return {"model": model, "messages": [message], "max_tokens": max_tokens, "temperature": 0}


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
                body = chat_body(index, max_tokens, server.model)
                r = await http.post(server.url + "/v1/chat/completions", json=body)
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
        t0, noise = time.perf_counter(), CpuNoise(server.pids())
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
    """The environment of the thumbtune server, the naive server and the ceiling: one malloc for the three
    (the server's, THUMBTUNE_ALLOCATOR), so that they compare serving, not allocators."""
    env = worker_env(
        THUMBTUNE_MODEL=settings.model,
        THUMBTUNE_CACHE_DIR=str(settings.cache_dir),
        THUMBTUNE_DTYPE=settings.dtype,
        THUMBTUNE_NUM_THREADS=str(settings.num_threads),
    )
    library = find_jemalloc() if settings.allocator == "jemalloc" else None
    return jemalloc_env(env, library) if library else env


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


def bench_server(
    server: ServerProcess,
    requests_per_client: int,
    max_tokens: int,
    *,
    naive: bool,
    feedback: bool = True,
    stop: bool = True,
) -> dict:
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
    ratings = None
    if feedback:
        ids = [rid for lv in levels for rid in lv.response_ids]
        ratings = asyncio.run(feedback_bench(server.url, ids, FEEDBACK_RATINGS))
        console.print(
            f"  feedback: {ratings['ratings']} ratings, p50 {ratings['p50_ms']:.2f} ms, "
            f"p99 {ratings['p99_ms']:.2f} ms, statuses {ratings['statuses']}"
        )
    # the kernel's peak RSS of each of its processes (vLLM: the API server and its engine core)
    hwm = sum(proc_status(pid, "VmHWM") or 0 for pid in process_tree(server.pid))
    if stop:
        server.stop()
    return {"ready_s": ready_s, "levels": levels, "rss_peak_bytes": hwm, "feedback": ratings}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def bench_vllm(
    settings: Settings, env: dict[str, str], tmp: Path, servers: list[ServerProcess], **level
) -> dict:
    """vllm directly, then thumbtune+vllm in front of it, then the log-prob mismatch; {"skipped": why}
    when vLLM is not installed."""
    try:
        python = vllm_python(settings)
    except VLLMNotInstalled as exc:
        console.print(f"[bold red]!!! vLLM contenders SKIPPED: {exc}[/]")
        return {"skipped": str(exc)}
    settings = settings.model_copy(update={"vllm_port": free_port()})
    argv, vllm_env = vllm_command(settings, python)
    model = resolve(settings).model_id
    servers.append(
        ServerProcess("vllm", argv, settings.vllm_port, vllm_env, tmp, ready_path="/health", model=model)
    )
    vllm = servers[-1]
    direct = bench_server(vllm, naive=False, feedback=False, stop=False, **level)
    port = free_port()
    env = dict(env, THUMBTUNE_PORT=str(port), THUMBTUNE_ENGINE="vllm", THUMBTUNE_VLLM_URL=vllm.url)
    servers.append(ServerProcess("thumbtune+vllm", THUMBTUNE_SERVE, port, env, tmp, behind=vllm))
    front = bench_server(servers[-1], naive=False, feedback=False, **level)
    console.print("[bold]log-prob mismatch[/]: vLLM's samples scored by the learner's forward pass ...")
    mismatch = logprob_mismatch(settings, vllm.url, model, level["max_tokens"])
    vllm.stop()
    return {"vllm": direct, "thumbtune+vllm": front, "mismatch": mismatch}


def run(
    settings: Settings,
    out: Path | None = None,
    requests_per_client: int = 4,
    max_tokens: int = 64,
    with_vllm: bool = True,
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
                feedback=False,
            )
            vllm = (
                bench_vllm(
                    settings,
                    env,
                    Path(tmp),
                    servers,
                    requests_per_client=requests_per_client,
                    max_tokens=max_tokens,
                )
                if with_vllm
                else {"skipped": "--no-vllm"}
            )
            result = report(ceiling, tt, naive, vllm, max_tokens, time.perf_counter() - started)
        finally:
            for server in servers:  # before the temp dir (logs, spool) goes; a stopped one is a no-op
                server.stop()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
        console.print(f"wrote {out}")
    return result
