"""`thumbtune bench canary`: the canary drill. Does a bad version get stopped, fast, and a good one promoted?

1. Two adapters, trained once and kept under --adapters (`bench ablate`'s on-policy loop, one process and
   core each, both at once): the *good* one on the users' rule (--good-versions PPO updates), the *bad*
   one on its inverse (``not:RULE``, --bad-versions updates): a version that learnt the opposite of what
   users want, small enough a step to pass the KL checks.
2. Per repetition (seed), a fresh system: the embedded broker and one server (`thumbtune serve`, the
   product's canary settings but for the exposure, --canary-share and --compare-share; no learner),
   live = the base. Simulated users chat without pause:
   --thumb-users rate single answers with a thumb, --compare-users pick the better of two (`n` = 2),
   each request from one of --population users (the `user` field), so the canary's share is a share
   of users, as in production.
3. The drill publishes the good adapter as v1 (into the store, announced on ``thumbtune.adapters``, as
   the learner does); it passes admission, becomes the canary, and the judge decides. Then the bad one
   as v2, against whatever is live. Every decision is read from ``/admin/adapters``.
4. Per decision: ratings and wall time from the canary's start to the decision, its verdict, and the
   answers each version gave meanwhile. Wrong decisions: the good one refused, or the bad one promoted;
   a canary undecided after --max-ratings ratings counts as undecided (neither).

The bad version's exposure is reported two ways: its share of the answers served while it was the
canary (set by THUMBTUNE_CANARY_SHARE and _COMPARE_SHARE), and its share of all answers in the drill
(from the good canary's start to the bad one's end).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.canary_adapters import train_adapters
from benchmarks.common import machine
from benchmarks.system import System
from thumbtune.cli.rules import load_rule
from thumbtune.cli.simulate import Rating, Simulator
from thumbtune.core.settings import Settings

CANARY_SHARE = 0.05
COMPARE_SHARE = 0.0
"""The drill's exposure (THUMBTUNE_CANARY_SHARE, THUMBTUNE_CANARY_COMPARE_SHARE): 5% of the users on the
canary and no other user's compare request mixed, so the canary gives 3-4% of the answers (its users'
compare requests get one answer from each version: half their answers). Against a live version users
like, a thumb says more about a bad canary per answer it costs than a comparison does (two answers the
rule scores alike are a coin flip); the product's defaults (0.1 and 0.5) decide in fewer ratings and
expose ~21%."""
EXPECTED = {"good": "promoted", "bad": "rolled back"}
WRONG = {"good": ("rolled back", "refused at admission"), "bad": ("promoted",)}
"""A bad version refused at admission (KL, capability) never reached users: not wrong, but not the drill."""


@dataclass
class Canary:
    """One version's way through the drill, as read from ``/admin/adapters``."""

    role: str
    version: str
    published_at: float
    canary_at: float | None = None
    decided_at: float | None = None
    outcome: str = "undecided"
    """promoted, rolled back, refused at admission, or undecided (no verdict within --max-ratings)."""
    reason: str | None = None
    ratings: int = 0
    """Ratings accepted from the canary's start to its decision (all versions': the users' effort)."""
    answers: dict[str, float] = field(default_factory=dict)
    """Answers each version gave meanwhile (a mixed compare request counts half its answers to each)."""


def answers_by_version(ratings: list[Rating], start: float, end: float) -> dict[str, float]:
    """Answers per version among the requests sent in [start, end]."""
    out: dict[str, float] = {}
    for r in ratings:
        if start <= r.sent_at <= end:
            versions = r.adapter_version.split("+")
            for version in versions:
                out[version] = out.get(version, 0.0) + len(r.responses) / len(versions)
    return out


def _rated_since(users: list[Simulator], since: float) -> int:
    return sum(r.rated_at >= since for u in users for r in u.report.ratings)


async def _follow(
    system: System, canary: Canary, users: list[Simulator], tasks: list[asyncio.Task], max_ratings: int
) -> None:
    """Poll ``/admin/adapters`` until the version is decided, or --max-ratings pass undecided."""
    while True:
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise RuntimeError(f"the simulated users stopped: {task.exception()}")
        view = await asyncio.to_thread(system.adapters)
        now = time.time()
        row = next((v for v in view["versions"] if v["version"] == canary.version), None)
        stage = row["stage"] if row else "unchecked"
        if view.get("canary") and view["canary"]["version"] == canary.version and canary.canary_at is None:
            canary.canary_at = view["canary"]["since"]
        if stage in ("live", "refused"):
            canary.decided_at = now
            if stage == "live":
                canary.outcome = "promoted"
            else:
                refusal = view["refused"].get(canary.version) or {}
                canary.reason = f"{refusal.get('reason')}: {refusal.get('message')}"
                canary.outcome = "rolled back" if canary.canary_at is not None else "refused at admission"
            return
        since = canary.canary_at or canary.published_at
        if _rated_since(users, since) > max_ratings:
            canary.decided_at = now
            canary.reason = (view.get("canary") or {}).get("reason")
            return
        await asyncio.sleep(0.5)


async def _drill(system: System, adapters: Path, users: list[Simulator], max_ratings: int) -> list[Canary]:
    tasks = [asyncio.create_task(u.run_async()) for u in users]
    canaries = []
    try:
        for number, role in enumerate(("good", "bad"), start=1):
            canary = Canary(role, f"v{number}", time.time())
            await asyncio.to_thread(system.publish, adapters / role, canary.version)
            await _follow(system, canary, users, tasks, max_ratings)
            canaries.append(canary)
    finally:
        for u in users:
            u.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
    every = [r for u in users for r in u.report.ratings]
    for c in canaries:
        start, end = c.canary_at or c.published_at, c.decided_at or time.time()
        c.ratings = sum(start <= r.rated_at <= end for r in every)
        c.answers = answers_by_version(every, start, end)
    return canaries


def repetition(
    root: Path,
    adapters: Path,
    *,
    rule: str,
    seed: int,
    thumb_users: int,
    compare_users: int,
    population: int,
    max_tokens: int,
    max_ratings: int,
    settings: dict[str, str],
) -> dict:
    """One drill on a fresh system; its canaries and the bad version's exposure."""
    judge = load_rule(rule)
    with System(root, settings) as system:
        users = [
            Simulator(
                system.url,
                judge,
                users=n,
                thumbs=10**9,
                choice=choice,
                max_tokens=max_tokens,
                seed=seed * 2 + choice,
                population=population,
            )
            for n, choice in ((thumb_users, False), (compare_users, True))
            if n
        ]
        started = time.time()
        canaries = asyncio.run(_drill(system, adapters, users, max_ratings))
    every = [r for u in users for r in u.report.ratings]
    good, bad = canaries
    drill_answers = answers_by_version(
        every, good.canary_at or good.published_at, bad.decided_at or time.time()
    )
    return {
        "seed": seed,
        "canaries": [asdict(c) for c in canaries],
        "correct": all(c.outcome == EXPECTED[c.role] for c in canaries),
        "wrong": [c.role for c in canaries if c.outcome in WRONG[c.role]],
        "bad_share_while_canary": _share(bad.answers, bad.version),
        "bad_share_of_drill": _share(drill_answers, bad.version),
        "wall_s": round(time.time() - started, 1),
        "traffic": {  # what `bench canary-replay` takes: --thumb-fraction and --ratings-per-s
            "thumb_fraction": sum(len(r.responses) == 1 for r in every) / max(1, len(every)),
            "ratings_per_s": len(every) / max(1e-9, time.time() - started),
        },
        "errors": sum((u.report.errors for u in users), start=type(users[0].report.errors)()),
    }


def _share(answers: dict[str, float], version: str) -> float | None:
    total = sum(answers.values())
    return answers.get(version, 0.0) / total if total else None


def report(results: dict) -> list[str]:
    """Per repetition one line per canary, then the figures over all repetitions."""
    lines = []
    for rep in results["repetitions"]:
        for c in rep["canaries"]:
            took = (c["decided_at"] - c["canary_at"]) if c["canary_at"] and c["decided_at"] else None
            lines.append(
                f"seed {rep['seed']:>2} {c['role']:<4} {c['version']}: {c['outcome']:<21} "
                f"after {c['ratings']:>4} ratings, {'-' if took is None else f'{took:6.1f} s'}; answers "
                + ", ".join(f"{v} {n:g}" for v, n in sorted(c["answers"].items()))
            )
        lines.append(
            f"seed {rep['seed']:>2} bad version's share of answers: {_pct(rep['bad_share_while_canary'])} "
            f"while it was the canary, {_pct(rep['bad_share_of_drill'])} of the drill"
        )
    reps = results["repetitions"]
    for role in ("good", "bad"):
        mine = [c for rep in reps for c in rep["canaries"] if c["role"] == role]
        decided = [c for c in mine if c["outcome"] == EXPECTED[role]]
        counts = statistics.median([c["ratings"] for c in decided]) if decided else None
        slowest = max((c["ratings"] for c in decided), default=None)
        secs = [c["decided_at"] - c["canary_at"] for c in decided if c["canary_at"]]
        lines.append(
            f"{role}: {len(decided)}/{len(mine)} {EXPECTED[role]}; ratings to the decision median {counts}, "
            f"max {slowest}; seconds median {statistics.median(secs) if secs else '-'}"
        )
    shares = [r["bad_share_while_canary"] for r in reps if r["bad_share_while_canary"] is not None]
    drill = [r["bad_share_of_drill"] for r in reps if r["bad_share_of_drill"] is not None]
    wrong = sum(len(r["wrong"]) for r in reps)
    while_canary = _pct(statistics.median(shares) if shares else None)
    of_drill = _pct(statistics.median(drill) if drill else None)
    lines.append(
        f"wrong decisions: {wrong} in {len(reps)} repetitions; the bad version's share of answers: while "
        f"canary median {while_canary}, of the drill median {of_drill} (max {_pct(max(drill, default=None))})"
    )
    return lines


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def run(
    out: Path,
    *,
    adapters: Path,
    rule: str = "concise",
    repetitions: int = 20,
    first_seed: int = 1,
    good_versions: int = 16,
    bad_versions: int = 8,
    thumb_users: int = 4,
    compare_users: int = 4,
    population: int = 1000,
    max_tokens: int = 48,
    max_ratings: int = 1000,
    canary_share: float = CANARY_SHARE,
    compare_share: float = COMPARE_SHARE,
) -> dict:
    """Train (or reuse) the two adapters, then the drill ``repetitions`` times; prints and writes
    OUT/results.json after every repetition (a long run can be read, or stopped, half-way)."""
    load_rule(rule)  # a bad rule fails now, not after the training
    if out.exists() and any(p.name.startswith("seed-") for p in out.iterdir()):
        raise ValueError(f"{out} holds an earlier drill: give bench canary a new --out")
    trained = train_adapters(adapters, rule, good_versions, bad_versions, seed=1)
    settings = {
        "THUMBTUNE_CANARY_SHARE": str(canary_share),
        "THUMBTUNE_CANARY_COMPARE_SHARE": str(compare_share),
    }
    product = {k: v for k, v in Settings().model_dump().items() if k.startswith("canary_")}
    results: dict = {
        "config": {
            "rule": rule,
            "thumb_users": thumb_users,
            "compare_users": compare_users,
            "population": population,
            "max_tokens": max_tokens,
            "max_ratings": max_ratings,
            **machine(),
            "canary": product | {"canary_share": canary_share, "canary_compare_share": compare_share},
        },
        "adapters": {name: t.get("evaluations") for name, t in trained.items()},
        "repetitions": [],
    }
    for seed in range(first_seed, first_seed + repetitions):
        rep = repetition(
            out / f"seed-{seed}",
            adapters,
            rule=rule,
            seed=seed,
            thumb_users=thumb_users,
            compare_users=compare_users,
            population=population,
            max_tokens=max_tokens,
            max_ratings=max_ratings,
            settings=settings,
        )
        results["repetitions"].append(rep)
        print("\n".join(report({"repetitions": [rep]})[:-3]), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    for line in report(results):
        print(line)
    print(f"[bench canary] wrote {out / 'results.json'}")
    return results
