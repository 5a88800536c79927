"""`thumbtune simulate`: N concurrent simulated users chat with a running server and rate every answer.

Each user loops: pick a prompt from the bundled set, ask for an answer (two with ``--choice``, K with
``--rank K``), judge each with the rule (`thumbtune.cli.rules`), optionally flip the verdict with
probability ``noise`` (an inconsistent human: a thumb or a choice flips, a rating mirrors, a ranking
reverses), and POST the rating to /v1/feedback. It goes through the public API only,
exactly as a chat client and its users would; it knows nothing of the learner.

One rating is one user action: a thumb, a 1-5 rating, one choice between two answers (two events) or one
ranking of K answers, best first by the rule's score (K events). The run stops after ``thumbs`` ratings.
HTTP failures are retried with back-off and counted; they never become ratings.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import httpx

from thumbtune.cli import rules
from thumbtune.cli.rules import Rule

PROMPT_SETS = ("train", "heldout")


def load_prompts(which: str = "train") -> list[str]:
    """A bundled prompt set ('train' or 'heldout'), or a text file with one prompt per line."""
    if which in PROMPT_SETS:
        text = (resources.files("thumbtune.cli") / "data" / f"prompts_{which}.txt").read_text(
            encoding="utf-8"
        )
    else:
        path = Path(which)
        if not path.is_file():
            raise ValueError(f"prompts {which!r}: not one of {PROMPT_SETS} and not a file")
        text = path.read_text(encoding="utf-8")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts {which!r}: no prompts")
    return prompts


@dataclass
class Rating:
    """One simulated user action, as the simulator saw it."""

    sent_at: float
    """Wall-clock time the chat request was sent."""
    rated_at: float
    """Wall-clock time the server accepted the rating."""
    adapter_version: str
    prompt: str
    responses: list[str]
    approved: list[bool]
    """The rule's verdict on each answer, before noise: what `approval` measures."""
    feedback: dict
    """The body POSTed to /v1/feedback (after noise)."""
    flipped: bool
    event_ids: list[str]
    words: list[int]


@dataclass
class Report:
    ratings: list[Rating] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    started_at: float = 0.0
    finished_at: float = 0.0

    def by_version(self) -> dict[str, dict[str, float]]:
        """Per adapter version: ratings, the rule's approval of the answers, mean words."""
        groups: dict[str, list[Rating]] = defaultdict(list)
        for r in self.ratings:
            groups[r.adapter_version].append(r)
        out = {}
        for version, rs in sorted(groups.items(), key=lambda kv: _version_key(kv[0])):
            verdicts = [a for r in rs for a in r.approved]
            lengths = [w for r in rs for w in r.words]
            out[version] = {
                "ratings": len(rs),
                "approval": sum(verdicts) / len(verdicts),
                "mean_words": sum(lengths) / len(lengths),
            }
        return out

    def write_jsonl(self, path: Path) -> None:
        with path.open("w", encoding="utf-8") as f:
            for r in self.ratings:
                f.write(json.dumps(asdict(r)) + "\n")


def _version_key(version: str) -> tuple[int, str]:
    return (int(version[1:]), version) if version[:1] == "v" and version[1:].isdigit() else (-1, version)


class Simulator:
    def __init__(
        self,
        url: str,
        rule: Rule,
        *,
        users: int = 8,
        thumbs: int = 100,
        noise: float = 0.0,
        choice: bool = False,
        rank: int | None = None,
        temperature: float = 1.0,
        max_tokens: int = 48,
        prompts: list[str] | None = None,
        api_key: str | list[str] | None = None,
        model: str = "thumbtune",
        seed: int = 0,
        timeout_s: float = 300.0,
        think_s: float = 0.0,
        population: int | None = None,
        on_rating: Callable[[Rating, Report], None] | None = None,
    ) -> None:
        if users < 1 or thumbs < 1:
            raise ValueError("users and thumbs must be at least 1")
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise is a probability in [0, 1], got {noise}")
        if population is not None and population < 1:
            raise ValueError(f"population is a number of users, at least 1; got {population}")
        if think_s < 0:
            raise ValueError(f"think_s is a wait in seconds, at least 0; got {think_s}")
        if rank is not None and (choice or not 2 <= rank <= 4):
            raise ValueError(f"rank is K = 2 to 4 answers to order, without choice; got {rank}")
        self.url = url.rstrip("/")
        self.rule = rule
        self.users, self.thumbs, self.noise, self.choice, self.rank = users, thumbs, noise, choice, rank
        self.temperature, self.max_tokens, self.model = temperature, max_tokens, model
        self.prompts = prompts or load_prompts("train")
        keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
        self.headers = [{"Authorization": f"Bearer {key}"} for key in keys] or [{}]
        """Per user (user i sends ``headers[i % len]``): one API key for all, or each user its own,
        round-robin (so each counts as a rater of its own for the learner's rater caps)."""
        self.rng = random.Random(seed)
        self.timeout_s = timeout_s
        self.think_s = think_s
        """Seconds each user waits after a rating before asking again (0: as fast as the server answers)."""
        self.population = population
        """Each request comes from one of this many users (``user`` = "user-<seed>-<i>", drawn at random):
        what a canary's per-user share needs. None: anonymous requests, which always stay on live."""
        self._seed = seed
        self.on_rating = on_rating
        self.report = Report()
        self._reserved = 0

    def run(self) -> Report:
        return asyncio.run(self.run_async())

    def stop(self) -> None:
        """No new exchanges: each user finishes the one in flight, then `run_async` returns."""
        self.thumbs = self._reserved

    async def run_async(self) -> Report:
        self.report.started_at = time.time()
        limits = httpx.Limits(max_connections=self.users + 2, max_keepalive_connections=self.users + 2)
        async with httpx.AsyncClient(base_url=self.url, limits=limits, timeout=self.timeout_s) as client:
            try:
                async with asyncio.TaskGroup() as tg:
                    for i in range(self.users):
                        tg.create_task(self._user(client, i))
            except* SimulationError as group:
                raise group.exceptions[0] from None
        self.report.finished_at = time.time()
        return self.report

    async def _user(self, client: httpx.AsyncClient, index: int) -> None:
        rng = random.Random(self.rng.random() + index)
        headers = self.headers[index % len(self.headers)]
        while self._reserved < self.thumbs:
            self._reserved += 1
            try:
                rating = await self._one(client, rng, headers)
            except SimulationError:
                raise
            except Exception as exc:  # a failed exchange is counted, never rated
                self.report.errors[type(exc).__name__] += 1
                self._reserved -= 1
                await asyncio.sleep(min(5.0, 0.5 * (1 + self.report.errors.total() % 4)))
                continue
            self.report.ratings.append(rating)
            if self.on_rating is not None:
                self.on_rating(rating, self.report)
            if self.think_s and self._reserved < self.thumbs:
                await asyncio.sleep(self.think_s)

    async def _one(self, client: httpx.AsyncClient, rng: random.Random, headers: dict[str, str]) -> Rating:
        prompt = rng.choice(self.prompts)
        sent_at = time.time()
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "n": self.rank or (2 if self.choice else 1),
        }
        if self.population is not None:
            body["user"] = f"user-{self._seed}-{rng.randrange(self.population)}"
        completion = await _post(client, "/v1/chat/completions", body, headers)
        answers = [c["message"]["content"] for c in completion["choices"]]
        ids = [c["response_id"] for c in completion["choices"]]
        try:
            verdicts = [rules.judge(self.rule, prompt, a) for a in answers]
        except Exception as exc:
            raise SimulationError(f"the rule failed on an answer: {exc!r}") from exc
        flipped = rng.random() < self.noise
        if self.rank:
            order = list(range(len(ids)))
            rng.shuffle(order)  # ties broken at random: the sort below is stable
            order.sort(key=lambda i: rules.score(verdicts[i]), reverse=True)
            feedback = {"ranking": [ids[i] for i in (order[::-1] if flipped else order)]}
        elif self.choice:
            scores = [rules.score(v) for v in verdicts]
            best = 0 if scores[0] > scores[1] else 1 if scores[1] > scores[0] else rng.randrange(2)
            if flipped:
                best = 1 - best
            feedback = {"chosen": ids[best], "rejected": ids[1 - best]}
        elif isinstance(verdicts[0], bool):
            feedback = {"response_id": ids[0], "thumb": "up" if verdicts[0] != flipped else "down"}
        else:
            stars = rules.rating(verdicts[0])
            feedback = {"response_id": ids[0], "rating": 6 - stars if flipped else stars}
        accepted = await _post(client, "/v1/feedback", feedback, headers)
        return Rating(
            sent_at=sent_at,
            rated_at=time.time(),
            adapter_version=completion["adapter_version"],
            prompt=prompt,
            responses=answers,
            approved=[rules.approves(v) for v in verdicts],
            feedback=feedback,
            flipped=flipped,
            event_ids=accepted["event_ids"],
            words=[rules.words(a) for a in answers],
        )


class SimulationError(RuntimeError):
    """Retrying cannot help (a 4xx answer such as a bad key, or a broken rule): the run stops, with why."""


async def _post(
    client: httpx.AsyncClient, path: str, body: dict, headers: dict[str, str], attempts: int = 8
) -> dict:
    """POST with retries on 429/5xx (honouring Retry-After) and transport errors; 4xx is fatal."""
    for attempt in range(attempts):
        try:
            resp = await client.post(path, json=body, headers=headers)
        except httpx.TransportError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(min(8.0, 0.5 * 2**attempt))
            continue
        if resp.status_code < 400:
            return resp.json()
        if resp.status_code in (429, 503) or resp.status_code >= 500:
            retry_after = resp.headers.get("retry-after", "")
            wait = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else 0.5 * 2**attempt
            if attempt < attempts - 1:
                await asyncio.sleep(min(30.0, wait))
                continue
            resp.raise_for_status()
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:300]
        raise SimulationError(f"POST {path} -> {resp.status_code}: {message}")
    raise AssertionError("unreachable")


def summary_lines(report: Report) -> list[str]:
    wall = max(1e-9, report.finished_at - report.started_at)
    lines = [
        f"{len(report.ratings)} ratings in {wall:.0f} s ({len(report.ratings) / wall:.2f}/s), "
        f"{sum(r.flipped for r in report.ratings)} flipped by noise, "
        f"errors: {dict(report.errors) or 'none'}",
        f"{'version':>8} {'ratings':>8} {'approval':>9} {'mean words':>11}",
    ]
    for version, row in report.by_version().items():
        lines.append(f"{version:>8} {row['ratings']:>8} {row['approval']:>9.1%} {row['mean_words']:>11.1f}")
    return lines


def progress_printer(every: int = 25) -> Callable[[Rating, Report], None]:
    """An on_rating hook printing the approval of the last `every` ratings and the versions answering."""

    def hook(rating: Rating, report: Report) -> None:
        n = len(report.ratings)
        if n % every:
            return
        recent = report.ratings[-every:]
        verdicts = [a for r in recent for a in r.approved]
        versions = sorted({r.adapter_version for r in recent}, key=_version_key)
        print(
            f"[simulate] {n} ratings: approval of the last {every} {sum(verdicts) / len(verdicts):.0%}, "
            f"mean words {sum(w for r in recent for w in r.words) / len(verdicts):.1f}, "
            f"answered by {', '.join(versions)}",
            flush=True,
        )

    return hook
