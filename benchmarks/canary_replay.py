"""`thumbtune bench canary-replay`: the canary drill's decisions on synthetic rating streams, many seeds.

A real drill (`bench canary`) costs 10-25 minutes a repetition on this machine, too few for error rates.
The replay drives the product's own decision path with ratings drawn at random, thousands of times:

    who answers      `ServingModels.answers` (the canary's users by the sha256 draw of `user` ids from
                     --population; a canary user's compare request, and --compare-share of the others',
                     one answer from each version)
    the tallies      `VersionRatings`, fed `FeedbackEvent`s as the feedback topic would carry them
    the decision     `judge` (both anytime-valid tests), looked at once a (simulated) second, as each
                     replica's judge does

The users are the drill's: a --thumb-fraction of the requests rate one answer with a thumb, the rest ask
for two and choose. An answer of version v is approved with probability p_v, independently: the held-out
approval of the drill's adapters under the rule (`concise`: base 20.3%, good 75.0%, bad 7.8%, measured in
docs/BENCHMARKS.md); a chooser takes the approved answer of two, a coin between equals (as `simulate
--choice` with a 0/1 rule). Ratings arrive --ratings-per-s apart. Per seed: the good version is the canary
against the base, then the bad one against the good (live once promoted), each until the judge decides or
--max-ratings pass. What the replay leaves out: the real drill's admission, the users' prompts (approval
varies by prompt, so the real streams are burstier) and every system failure; what it gives is the test's
error rates and the spread of ratings to a decision at a given exposure. With ``--oracle`` the decision is
Wald's SPRT told the approval rates instead (benchmarks/canary_bound.py): the floor under any test.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from service.canary.judge import judge
from service.canary.ratings import VersionRatings
from service.canary.sequential import Verdict
from service.engine.registry import UnknownAdapter
from service.serving_models import ServingModels
from thumbtune.core.contract import FeedbackEvent, FeedbackKind
from thumbtune.core.settings import Settings

APPROVAL = {"base": 0.203, "good": 0.750, "bad": 0.078}
"""Held-out approval under `concise` of the drill's adapters and the base (docs/BENCHMARKS.md)."""
THUMB_FRACTION = 0.57
RATINGS_PER_S = 0.47
"""The drill's traffic: its 4 thumb and 4 compare users send ~1.3 thumb requests per compare request, and
on this machine ~0.47 ratings a second (the first drill: 117 ratings in 247 s)."""
Decide = Callable[[VersionRatings, str, str, float, Settings, float], Verdict]
"""(tallies, canary, live, canary's start, settings, now) -> verdict: the product's `judge`, or a bound's."""


def product_judge(
    ratings: VersionRatings, canary: str, live: str, since: float, settings: Settings, now: float
) -> Verdict:
    return judge(ratings, canary, live, since, settings, now).verdict


START = 1_000_020.0
"""Simulated clock at the first rating (any time: the tallies bucket by minute)."""


class _Registry:
    """What `ServingModels` asks of the adapter registry: the canary and its share, version names."""

    def __init__(self, live: str, canary: str, share: float) -> None:
        self.live, self.canary, self.canary_share = live, canary, share

    def resolve(self, requested: str) -> str:
        version = requested or self.live
        if version not in (self.live, self.canary):
            raise UnknownAdapter(version)
        return version

    def versions(self) -> list[str]:
        return [self.live, self.canary]


@dataclass
class Outcome:
    role: str
    verdict: str
    """promote, rollback or undecided (no decision within --max-ratings)."""
    ratings: int
    canary_share_of_answers: float


class Stream:
    """One seed's users and tallies: ratings go in, the judge is asked once a simulated second."""

    def __init__(
        self, rng: random.Random, settings: Settings, thumb_fraction: float, population: int
    ) -> None:
        self.rng, self.settings = rng, settings
        self.thumb_fraction, self.population = thumb_fraction, population
        self.ratings, self.ids = VersionRatings(), 0

    def _id(self) -> str:
        self.ids += 1
        return f"r{self.ids}"

    def _event(self, kind: FeedbackKind, version: str, at: float, value: str, reward: float, **extra) -> None:
        self.ratings.add(
            FeedbackEvent.model_construct(
                kind=kind, adapter_version=version, answered_at=at, value=value, reward=reward, **extra
            )
        )

    def rate_once(self, models: ServingModels, rates: dict[str, float], at: float) -> dict[str, float]:
        """One user's request and rating; returns the answers each version gave."""
        user = f"user-{self.rng.randrange(self.population)}"
        n = 1 if self.rng.random() < self.thumb_fraction else 2
        versions = models.answers("thumbtune", n, user)
        approved = [self.rng.random() < rates[v] for v in versions]
        if n == 1:
            up = approved[0]
            self._event(FeedbackKind.thumb, versions[0], at, "up" if up else "down", 1.0 if up else -1.0)
        else:
            chosen = self.rng.randrange(2) if approved[0] == approved[1] else approved.index(True)
            ids = [self._id(), self._id()]
            self._event(FeedbackKind.choice, versions[chosen], at, "chosen", 1.0, response_id=ids[chosen])
            self._event(
                FeedbackKind.choice,
                versions[1 - chosen],
                at,
                "rejected",
                -1.0,
                response_id=ids[1 - chosen],
                paired_response_id=ids[chosen],
            )
        answers: dict[str, float] = {}
        for v in versions:
            answers[v] = answers.get(v, 0.0) + 1
        return answers


def canary_run(
    stream: Stream,
    live: str,
    canary: str,
    rates: dict[str, float],
    start: float,
    per_s: float,
    most: int,
    decide: Decide = product_judge,
) -> tuple[str, int, float, float]:
    """``canary`` against ``live`` from ``start`` until a verdict: (verdict, ratings, canary share, end)."""
    registry = _Registry(live, canary, stream.settings.canary_share)
    models = ServingModels(registry, "base", compare_share=stream.settings.canary_compare_share)
    now, looked, given = start, start, {live: 0.0, canary: 0.0}
    for rating in range(1, most + 1):
        now += stream.rng.expovariate(per_s)
        for version, count in stream.rate_once(models, rates, now).items():
            given[version] += count
        if now - looked >= 1.0:  # the judge's interval
            looked = now
            verdict = decide(stream.ratings, canary, live, start, stream.settings, now)
            if verdict is not Verdict.undecided:
                return verdict.value, rating, given[canary] / sum(given.values()), now
    return "undecided", most, given[canary] / sum(given.values()), now


def replay(
    seed: int,
    settings: Settings,
    *,
    approval: dict[str, float] = APPROVAL,
    thumb_fraction: float = THUMB_FRACTION,
    ratings_per_s: float = RATINGS_PER_S,
    population: int = 1000,
    max_ratings: int = 1000,
    decide: Callable[[dict[str, float]], Decide] | None = None,
) -> list[Outcome]:
    """One drill: the good version against the base, then the bad one against whatever is live. ``decide``
    makes the decision rule from the versions' approval rates (default: the product's judge)."""
    stream = Stream(random.Random(seed), settings, thumb_fraction, population)
    rates = {"v0": approval["base"], "v1": approval["good"], "v2": approval["bad"]}
    rule = product_judge if decide is None else decide(rates)
    outcomes, live, now = [], "v0", START
    for role, version in (("good", "v1"), ("bad", "v2")):
        verdict, ratings, share, now = canary_run(
            stream, live, version, rates, now, ratings_per_s, max_ratings, rule
        )
        outcomes.append(Outcome(role, verdict, ratings, share))
        if verdict == "promote":
            live = version
    return outcomes


EXPECTED = {"good": "promote", "bad": "rollback"}
WRONG = {"good": "rollback", "bad": "promote"}


WITHIN_RATINGS, MAX_BAD_SHARE = 200, 0.05
"""Issue 14's target for the drill: each decision within 200 ratings, the bad version <= 5% of answers."""


def met(outcome: Outcome) -> bool:
    """The right decision within WITHIN_RATINGS, and a bad version at most MAX_BAD_SHARE of the answers."""
    small = outcome.role != "bad" or outcome.canary_share_of_answers <= MAX_BAD_SHARE
    return outcome.verdict == EXPECTED[outcome.role] and outcome.ratings <= WITHIN_RATINGS and small


def met_target(run: list[Outcome]) -> bool:
    """Both decisions met (`met`): the drill's target for one repetition."""
    return all(met(o) for o in run)


def summary(runs: list[list[Outcome]]) -> list[str]:
    """Per role: right, wrong and undecided counts; ratings to the right decision; the canary's share. Then
    how many drills met the whole target, and so the chance of 20 in a row."""
    lines = []
    for role in ("good", "bad"):
        mine = [o for run in runs for o in run if o.role == role]
        right = [o for o in mine if o.verdict == EXPECTED[role]]
        wrong = sum(o.verdict == WRONG[role] for o in mine)
        ratings = sorted(o.ratings for o in right)
        shares = sorted(o.canary_share_of_answers for o in right)
        within = sum(r <= WITHIN_RATINGS for r in ratings)
        lines.append(
            f"{role}: {len(right)}/{len(mine)} {EXPECTED[role]}, {wrong} wrong, "
            f"{len(mine) - len(right) - wrong} undecided; ratings to it median {_q(ratings, 0.5)}, "
            f"90th percentile {_q(ratings, 0.9)}, within {WITHIN_RATINGS}: {within}/{len(mine)}; "
            f"the canary's share of answers median {_q(shares, 0.5, '.1%')}, "
            f"90th percentile {_q(shares, 0.9, '.1%')}; "
            f"meeting its target: {sum(met(o) for o in mine)}/{len(mine)}"
        )
    rate = sum(met_target(run) for run in runs) / len(runs)
    lines.append(
        f"drills meeting the target (both right, each within {WITHIN_RATINGS} ratings, the bad version "
        f"<= {MAX_BAD_SHARE:.0%} of answers while canary): {rate:.1%}; 20 of 20 in a row: {rate**20:.1%}"
    )
    return lines


def _q(values: list[float], q: float, spec: str = ".0f") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], spec)
    return format(statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1], spec)


def run(
    *,
    seeds: int = 1000,
    first_seed: int = 1,
    canary_share: float = 0.05,
    compare_share: float = 0.0,
    approval: dict[str, float] = APPROVAL,
    thumb_fraction: float = THUMB_FRACTION,
    ratings_per_s: float = RATINGS_PER_S,
    population: int = 1000,
    max_ratings: int = 1000,
    decide: Callable[[dict[str, float]], Decide] | None = None,
    label: str = "the product's judge",
) -> list[list[Outcome]]:
    """``seeds`` replays of the drill; prints the summary."""
    settings = Settings(canary_share=canary_share, canary_compare_share=compare_share)
    print(
        f"[bench canary-replay] {label}, {seeds} seeds, canary share {canary_share:g}, "
        f"compare share {compare_share:g}, "
        f"alpha {settings.canary_alpha:g}, margin {settings.canary_margin:g}; approval "
        + ", ".join(f"{k} {v:.1%}" for k, v in approval.items())
        + f"; {thumb_fraction:.0%} of requests thumbs, {ratings_per_s:g} ratings/s",
        flush=True,
    )
    runs = [
        replay(
            seed,
            settings,
            approval=approval,
            thumb_fraction=thumb_fraction,
            ratings_per_s=ratings_per_s,
            population=population,
            max_ratings=max_ratings,
            decide=decide,
        )
        for seed in range(first_seed, first_seed + seeds)
    ]
    for line in summary(runs):
        print(line)
    return runs
