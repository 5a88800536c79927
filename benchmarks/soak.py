"""`thumbtune bench soak`: one server process for a long time, swapping versions all the while.

Other engines leaked memory in adapter loads and unloads until they hung; a spool that fills and drains,
hours of streaming, and a broker that stalls are where a serving process goes wrong slowly. The soak:

1. Makes --adapters LoRA weight sets over the base once (random B ~ N(0, --noise^2): small steps that
   pass the KL checks), kept under OUT/source.
2. Starts the embedded broker and one `thumbtune serve` (canaries and the capability gate off, so each
   version goes live as soon as its file and KL checks pass: the soak measures serving, not judging).
3. For --minutes: --clients users chat without pause (half the requests streamed, the other half not)
   and rate every answer with a thumb; every --swap-every seconds the next version (v1, v2, ...: the
   weight sets in turn) is published into the store and announced, as the learner does, and is live
   within a few seconds; halfway, the broker is frozen (SIGSTOP) for --pause seconds, so ratings wait in
   the spool, then thawed. The server's RSS is sampled every 5 s.
4. Afterwards, once the spool is empty, every event on thumbtune.feedback is read back.

Reported against the targets (over 30 minutes and >= 200 swaps): RSS growth after the warm-up <= 5%
(median RSS of the last minute over that of the minute after --warmup), zero 5xx, zero lost ratings
(accepted with 202, never on the topic) and zero duplicated (one answer's rating on the topic twice), the
p99 chat latency of the last --window within 1.2x of the first's.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import torch
from kafka import TopicPartition

from benchmarks.common import machine
from benchmarks.system import System
from learner.checkpoint import new_state, save_version
from learner.config import LearnerSettings
from learner.policy import Policy
from thumbtune.core.base_model import load_base
from thumbtune.core.contract import FEEDBACK_TOPIC, FeedbackEvent
from thumbtune.core.kafka import make_consumer
from thumbtune.core.settings import Settings
from thumbtune.core.store import LocalAdapterStore

PROMPTS = [
    "Say something kind.",
    "What is the capital of France?",
    "Give me a tip for sleeping better.",
    "Explain what a prime number is.",
    "Write a haiku about rain.",
    "How do I boil an egg?",
]
TARGETS = {"rss_growth": 0.05, "p99_ratio": 1.2, "swaps": 200}
SERVER_SETTINGS = {"THUMBTUNE_CANARY_SHARE": "0", "THUMBTUNE_ADAPTER_CAPABILITY_PROMPTS": "0"}


@dataclass
class Request:
    at: float
    latency_s: float
    status: int
    """HTTP status; -1: no answer (connection failed or timed out)."""
    stream: bool
    feedback_status: int | None = None
    response_id: str | None = None


def make_adapters(out: Path, count: int, noise: float, seed: int = 0) -> LocalAdapterStore:
    """``count`` versions over the configured base in a store at ``out`` (kept: made once)."""
    store = LocalAdapterStore(out)
    if len(store.versions()) >= count:
        return store
    settings = Settings()
    base = load_base(settings)
    policy = Policy.fresh(base.model, settings, torch.device("cpu"), seed=seed)
    state = new_state(policy, LearnerSettings())
    generator = torch.Generator().manual_seed(seed)
    while len(store.versions()) < count:
        with torch.no_grad():
            for name, p in policy.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * noise)
        save_version(store, policy, state, base=base, event_ids=[])
    return store


def window_stats(requests: list[Request], start: float, window_s: float) -> list[dict]:
    """Chat latency p50/p99 (answered requests) and 5xx per window of ``window_s`` from ``start``."""
    if not requests:
        return []
    last = max(r.at for r in requests)
    out = []
    for i in range(int((last - start) // window_s) + 1):
        lo, hi = start + i * window_s, start + (i + 1) * window_s
        inside = [r for r in requests if lo <= r.at < hi]
        ok = sorted(r.latency_s for r in inside if r.status == 200)
        out.append(
            {
                "window": i,
                "requests": len(inside),
                "p50_s": ok[len(ok) // 2] if ok else None,
                "p99_s": ok[min(len(ok) - 1, int(0.99 * len(ok)))] if ok else None,
                "5xx": sum(r.status >= 500 or (r.feedback_status or 0) >= 500 for r in inside),
            }
        )
    return out


def rss_growth(samples: list[tuple[float, int]], start: float, warmup_s: float) -> float | None:
    """Median RSS of the last minute over the median of the minute after the warm-up, minus 1."""
    after = [rss for t, rss in samples if start + warmup_s <= t < start + warmup_s + 60]
    end = max((t for t, _ in samples), default=start)
    last = [rss for t, rss in samples if t >= end - 60]
    if not after or not last or end - 60 < start + warmup_s:
        return None
    return statistics.median(last) / statistics.median(after) - 1


def ratings_check(accepted: list[str], published: list[FeedbackEvent]) -> dict[str, int]:
    """Lost: accepted, never published; duplicated: published more than once (by answer or event id)."""
    by_response = Counter(e.response_id for e in published)
    by_event = Counter(e.event_id for e in published)
    return {
        "accepted": len(accepted),
        "published": len(published),
        "lost": len(set(accepted) - set(by_response)),
        "duplicated": sum(n - 1 for n in by_response.values() if n > 1)
        + sum(n - 1 for n in by_event.values() if n > 1),
    }


async def _user(http: httpx.AsyncClient, i: int, stop_at: float, max_tokens: int, log: list[Request]) -> None:
    rng = random.Random(i)
    while time.time() < stop_at:
        stream = rng.random() < 0.5
        body = {
            "model": "thumbtune",
            "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": max_tokens,
            "temperature": 0.8,
            "stream": stream,
            "user": f"soak-{i}",
        }
        req = Request(time.time(), 0.0, -1, stream)
        t0 = time.perf_counter()
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                req.status = resp.status_code
                req.response_id = resp.headers.get("x-thumbtune-response-ids")
                async for _ in resp.aiter_bytes():
                    pass
        except httpx.HTTPError:
            await asyncio.sleep(1)
        req.latency_s = time.perf_counter() - t0
        log.append(req)
        if req.status == 200 and req.response_id:
            rating = {"response_id": req.response_id, "thumb": rng.choice(["up", "down"])}
            try:
                req.feedback_status = (await http.post("/v1/feedback", json=rating)).status_code
            except httpx.HTTPError:
                req.feedback_status = -1


def _group(pid: int) -> list[int]:
    """``pid`` and its descendants (the broker command and Tansu, which has a session of its own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _swapper(
    system: System, source: LocalAdapterStore, stop_at: float, every: float, swaps: list
) -> None:
    sources, n, next_at = source.versions(), 0, time.time() + every
    while next_at < stop_at:
        await asyncio.sleep(max(0.0, next_at - time.time()))
        next_at += every
        n += 1
        version, t0 = f"v{n}", time.time()
        await asyncio.to_thread(system.publish, source.root, version, sources[(n - 1) % len(sources)])
        outcome = "timeout"
        while time.time() - t0 < 60:
            view = await asyncio.to_thread(system.adapters)
            if view["live"] == version:
                outcome = "live"
                break
            if version in view["refused"]:
                outcome = f"refused: {view['refused'][version]['reason']}"
                break
            await asyncio.sleep(0.2)
        swaps.append(
            {"version": version, "at": t0, "seconds": round(time.time() - t0, 2), "outcome": outcome}
        )
        stale = system.store / f"v{n - 4}"
        if n > 4 and stale.is_dir():  # bounded disk: versions no longer live are never read again here
            await asyncio.to_thread(shutil.rmtree, stale, True)


async def _drive(system: System, source: LocalAdapterStore, cfg: dict) -> dict:
    start = time.time()
    stop_at = start + cfg["minutes"] * 60
    server, broker = system.children[1].pid, system.children[0].pid
    requests: list[Request] = []
    swaps: list[dict] = []
    rss: list[tuple[float, int]] = []
    pause: dict = {}

    async def sample() -> None:
        while time.time() < stop_at:
            rss.append((time.time(), _rss_kb(server)))
            await asyncio.sleep(5)

    async def freeze() -> None:
        await asyncio.sleep(cfg["minutes"] * 30 - cfg["pause_s"] / 2)
        frozen = _group(broker)
        pause["at"] = time.time()
        for p in frozen:
            os.kill(p, signal.SIGSTOP)
        await asyncio.sleep(cfg["pause_s"])
        for p in frozen:
            os.kill(p, signal.SIGCONT)
        pause["seconds"] = round(time.time() - pause["at"], 1)

    timeout = httpx.Timeout(120.0)
    async with httpx.AsyncClient(base_url=system.url, timeout=timeout) as http:
        await asyncio.gather(
            sample(),
            freeze(),
            _swapper(system, source, stop_at, cfg["swap_every"], swaps),
            *(_user(http, i, stop_at, cfg["max_tokens"], requests) for i in range(cfg["clients"])),
        )
    return {"start": start, "requests": requests, "swaps": swaps, "rss": rss, "pause": pause}


def _published(system: System, timeout: float = 180) -> list[FeedbackEvent]:
    """Every event on thumbtune.feedback, once the server's spool is empty."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = httpx.get(f"{system.url}/metrics", timeout=30).text
        depth = [
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("thumbtune_spool_depth")
        ]
        if depth and depth[0] == 0:
            break
        time.sleep(1)
    consumer = make_consumer(Settings(kafka_bootstrap_servers=system.bootstrap), "bench-soak", group_id=None)
    try:
        partitions = None
        while not partitions and time.time() < deadline + 60:
            partitions = consumer.partitions_for_topic(FEEDBACK_TOPIC)
        tps = [TopicPartition(FEEDBACK_TOPIC, p) for p in sorted(partitions or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends, events = consumer.end_offsets(tps), []
        while any(consumer.position(tp) < ends[tp] for tp in tps) and time.time() < deadline + 60:
            for records in consumer.poll(timeout_ms=1000).values():
                events.extend(FeedbackEvent.model_validate_json(r.value) for r in records)
        return events
    finally:
        consumer.close()


def report(results: dict) -> list[str]:
    w, t = results["windows"], TARGETS
    first, last = (w[0]["p99_s"], w[-1]["p99_s"]) if w else (None, None)
    ratio = last / first if first and last else None
    growth, r, swaps = results["rss_growth"], results["ratings"], results["swaps"]
    live = sum(s["outcome"] == "live" for s in swaps)
    fives = sum(x["5xx"] for x in w)
    median_swap = statistics.median([s["seconds"] for s in swaps]) if swaps else "-"
    frozen = results["pause"].get("seconds", "-")
    return [
        f"[bench soak] {results['config']['minutes']} min, {len(results['requests'])} chat requests, "
        f"{live} of {len(swaps)} swaps live (median {median_swap} s)"
        f" (target >= {t['swaps']})",
        "  RSS growth after warm-up: "
        + ("-" if growth is None else f"{growth:+.1%}")
        + f" (target <= {t['rss_growth']:.0%})"
        f"; RSS MB first/last: {results['rss_mb'][0]}/{results['rss_mb'][1]}",
        f"  5xx: {fives} (target 0); chat requests without an answer: {results['no_answer']}",
        f"  ratings: {r['accepted']} accepted, {r['published']} on the topic, lost {r['lost']}, "
        f"duplicated {r['duplicated']} (target 0 and 0); broker frozen {frozen} s",
        "  p99 first/last window: "
        + ("-" if ratio is None else f"{first:.2f}/{last:.2f} s = {ratio:.2f}x")
        + f" (target <= {t['p99_ratio']}x)",
        *(
            f"  window {x['window']}: {x['requests']} requests, p50 {x['p50_s'] and round(x['p50_s'], 2)} s, "
            f"p99 {x['p99_s'] and round(x['p99_s'], 2)} s, 5xx {x['5xx']}"
            for x in w
        ),
    ]


def run(
    out: Path,
    *,
    minutes: float = 30.0,
    swap_every: float = 7.0,
    clients: int = 4,
    max_tokens: int = 32,
    pause_s: float = 30.0,
    window_s: float = 300.0,
    warmup_s: float = 300.0,
    adapters: int = 4,
    noise: float = 0.005,
) -> dict:
    """Make (or reuse) the weight sets, run the soak, print and write OUT/results.json."""
    cfg = {k: v for k, v in locals().items() if k != "out"}
    source = make_adapters(out / "source", adapters, noise)
    with System(out / "system", SERVER_SETTINGS) as system:
        driven = asyncio.run(_drive(system, source, cfg))
        published = _published(system)
    requests, start = driven["requests"], driven["start"]
    accepted = [r.response_id for r in requests if r.feedback_status == 202 and r.response_id]
    rss = driven["rss"]
    results = {
        "config": cfg | machine() | {"server_settings": SERVER_SETTINGS},
        "windows": window_stats(requests, start, window_s),
        "rss_growth": rss_growth(rss, start, warmup_s),
        "rss_mb": [round(rss[0][1] / 1024) if rss else None, round(rss[-1][1] / 1024) if rss else None],
        "rss": [(round(t - start, 1), kb) for t, kb in rss],
        "ratings": ratings_check(accepted, published),
        "no_answer": sum(r.status == -1 for r in requests),
        "swaps": driven["swaps"],
        "pause": {k: (round(v - start, 1) if k == "at" else v) for k, v in driven["pause"].items()},
        "requests": [asdict(r) for r in requests],
    }
    lines = report(results)
    print("\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"[bench soak] wrote {out / 'results.json'}")
    return results
