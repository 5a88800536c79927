"""The canary judge: promote the canary, roll it back, or wait, by anytime-valid tests on live users.

Every second, on every replica, with the tallies of `VersionRatings` (all replicas' ratings):

    approval      canary vs live, each counting the answers it gave since the canary started
                  (`decide_approval`: roll back when the difference is surely < 0; promote when it is surely
                  > -THUMBTUNE_CANARY_MARGIN)
    head-to-head  the canary's wins against live in comparisons whose answers came from the two
                  (`decide_head_to_head`: roll back when the win rate is surely < 1/2; promote when it is
                  surely > 1/2 - margin)

Each test runs at alpha / 2 (THUMBTUNE_CANARY_ALPHA), so by the union bound the chance that the judge
ever rolls back a canary at least as good as live, or ever promotes one worse than live by more than the
margin, is at most alpha, however often it looks. Either test's rollback rolls back (a refusal with the
test's figures as its reason, actor ``canary``); otherwise either test's promotion promotes.

Versions arrive faster than a canary can be judged (the learner writes one per 32 ratings; at a 10% share
the canary gets ~3 of them, and even a canary twice as liked as live needs ~25 to be promoted). Newer
checked versions wait for the slot (`AdapterManager.waiting`), and the newest of them replaces a canary
that is still undecided after THUMBTUNE_CANARY_REPLACE_AFTER ratings of its answers (``exhausted``: the
test could not tell it from live, and the waiting one has learnt more) or after THUMBTUNE_CANARY_MAX_WAIT_S
(``expired``). The test then starts afresh on the new candidate: evidence about one version is never
counted for another. With no newer version waiting, an undecided canary stays and says so.

Decisions go on thumbtune.control (`ControlPlane.propose`): every replica judges, the first record wins, and
the others are ignored when applied.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from service import metrics
from service.adapters.manager import AdapterManager
from service.canary.arena import Comparison, bootstrap_intervals, fit_ratings
from service.canary.ratings import Approval, HeadToHead, VersionRatings
from service.canary.sequential import Decision, Verdict, decide_approval, decide_head_to_head
from thumbtune.core.contract import ControlAction
from thumbtune.core.settings import Settings

log = logging.getLogger(__name__)

JUDGE_INTERVAL_S = 1.0
ARENA_INTERVAL_S = 10.0
"""How often approval and Elo per version (100 bootstrap fits) are refreshed for the metrics."""

for _bound in ("lower", "upper"):  # exported before the first canary: no canary, no interval (NaN)
    metrics.CANARY_DIFFERENCE.labels(_bound).set(float("nan"))
for _of in ("canary", "live", "head_to_head"):
    metrics.CANARY_RATINGS.labels(_of).set(0)

Propose = Callable[..., None]
"""`ControlPlane.propose(action, version, reason, actor=...)`."""


@dataclass(frozen=True)
class Judgement:
    version: str
    live: str
    since: float
    canary: Approval
    against: Approval
    """The live version's answers since the canary started."""
    head_to_head: HeadToHead
    approval: Decision
    comparison: Decision
    verdict: Verdict
    reason: str
    expired: bool
    """Undecided after THUMBTUNE_CANARY_MAX_WAIT_S."""
    exhausted: bool
    """Undecided after THUMBTUNE_CANARY_REPLACE_AFTER ratings of the canary's answers."""

    @property
    def replaceable(self) -> bool:
        """A newer checked version may take the slot."""
        return self.expired or self.exhausted


def judge(
    ratings: VersionRatings, canary: str, live: str, since: float, settings: Settings, now: float
) -> Judgement:
    """The two tests on the tallies as they stand, and what they decide together."""
    alpha = settings.canary_alpha / 2  # two tests, one error budget (union bound)
    mine, theirs = ratings.approval(canary, since), ratings.approval(live, since)
    h2h = ratings.head_to_head(canary, live)
    approval = decide_approval(
        mine.approvals,
        mine.ratings,
        theirs.approvals,
        theirs.ratings,
        margin=settings.canary_margin,
        alpha=alpha,
    )
    comparison = decide_head_to_head(h2h.wins, h2h.comparisons, margin=settings.canary_margin, alpha=alpha)
    tests = (approval, comparison)
    verdict = Verdict.undecided
    for wanted in (Verdict.rollback, Verdict.promote):
        decided = [t for t in tests if t.verdict is wanted]
        if decided:
            verdict, reason = wanted, "; ".join(t.reason for t in decided)
            break
    else:
        reason = "; ".join(t.reason for t in tests)
    undecided = verdict is Verdict.undecided
    expired = undecided and now - since > settings.canary_max_wait_s
    exhausted = undecided and mine.ratings >= settings.canary_replace_after
    if expired:
        reason = f"still undecided after {now - since:.0f} s (THUMBTUNE_CANARY_MAX_WAIT_S): {reason}"
    elif exhausted:
        reason = (
            f"still undecided after {mine.ratings} ratings of its answers "
            f"(THUMBTUNE_CANARY_REPLACE_AFTER {settings.canary_replace_after}): {reason}"
        )
    return Judgement(
        canary, live, since, mine, theirs, h2h, approval, comparison, verdict, reason, expired, exhausted
    )


def elo_ratings(comparisons: list[Comparison], anchor: str) -> dict[str, tuple[float, float, float]]:
    """version -> (Elo, lower, upper) with 95% bootstrap intervals, ``anchor`` (live) at 1000; {} when the
    anchor was in no comparison. A function of the multiset of comparisons (the bootstrap is seeded and
    runs on them in a canonical order), so it is remembered until they change: a dashboard polling
    /admin/adapters costs one fit per new comparison, not one per request (a fit of 100 is ~50 ms)."""
    counts = Counter((c.winner, c.loser) for c in comparisons)
    return dict(_elo_of(tuple(sorted(counts.items())), anchor))


@functools.lru_cache(maxsize=8)
def _elo_of(counts: tuple[tuple[tuple[str, str], int], ...], anchor: str) -> tuple:
    comparisons = [Comparison(w, loser) for (w, loser), n in counts for _ in range(n)]
    if not any(anchor in (c.winner, c.loser) for c in comparisons):
        return ()
    point = fit_ratings(comparisons, anchor)
    intervals = bootstrap_intervals(comparisons, anchor)
    return tuple((v, (elo, *intervals.get(v, (elo, elo)))) for v, elo in point.items())


class CanaryJudge:
    def __init__(
        self,
        settings: Settings,
        manager: AdapterManager,
        ratings: VersionRatings,
        lock: threading.Lock,
        propose: Propose,
        ready: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.manager = manager
        self.ratings = ratings
        self.lock = lock
        self.propose = propose
        self.ready = ready
        """Whether the tallies are complete enough to judge on (the feedback topic read to its end)."""
        self.last: Judgement | None = None
        self._proposed: set[tuple[str, Verdict]] = set()
        self._replacements: set[str] = set()
        """Versions this replica proposed to replace an undecided canary (once each)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="thumbtune-canary-judge", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        arena_at = 0.0
        while not self._stop.wait(JUDGE_INTERVAL_S):
            try:
                self.step()
                if time.monotonic() - arena_at > ARENA_INTERVAL_S:
                    arena_at = time.monotonic()
                    self.export_ratings()
            except Exception:  # noqa: BLE001 - a bug here must not stop judging the next canary
                log.exception("judging the canary failed")

    def export_ratings(self) -> None:
        """Approval and Elo per version as gauges (the dashboard's versions table)."""
        with self.lock:
            versions = self.ratings.versions()
            approvals = {v: self.ratings.approval(v) for v in versions}
            comparisons = self.ratings.comparisons()
        for version, approval in approvals.items():
            if approval.rate is not None:
                metrics.VERSION_APPROVAL.labels(version).set(approval.rate)
        live, nan = self.manager.live, float("nan")
        for version, (elo, low, high) in ({live: (nan, nan, nan)} | elo_ratings(comparisons, live)).items():
            for bound, value in (("estimate", elo), ("lower", low), ("upper", high)):
                metrics.VERSION_ELO.labels(version, bound).set(value)

    def step(self, now: float | None = None) -> Judgement | None:
        """Judge the canary once; propose its promotion or rollback when a test decides, or its replacement
        by the newest waiting version when it is undecided past its ratings or its time."""
        canary, since, live = self.manager.canary, self.manager.canary_since, self.manager.live
        if canary is None or since is None or not self.ready():
            self.last = None
            metrics.CANARY_DIFFERENCE.labels("lower").set(float("nan"))
            metrics.CANARY_DIFFERENCE.labels("upper").set(float("nan"))
            return None
        with self.lock:
            judgement = judge(self.ratings, canary, live, since, self.settings, now or time.time())
        self.last = judgement
        metrics.CANARY_DIFFERENCE.labels("lower").set(judgement.approval.interval.lower)
        metrics.CANARY_DIFFERENCE.labels("upper").set(judgement.approval.interval.upper)
        metrics.CANARY_RATINGS.labels("canary").set(judgement.canary.ratings)
        metrics.CANARY_RATINGS.labels("live").set(judgement.against.ratings)
        metrics.CANARY_RATINGS.labels("head_to_head").set(judgement.head_to_head.comparisons)
        if judgement.verdict is not Verdict.undecided and (canary, judgement.verdict) not in self._proposed:
            self._proposed.add((canary, judgement.verdict))
            action = ControlAction.promote if judgement.verdict is Verdict.promote else ControlAction.refuse
            log.warning("canary %s: %s (%s)", canary, judgement.verdict.value, judgement.reason)
            self.propose(action, canary, judgement.reason, actor="canary")
        waiting = self.manager.waiting
        if judgement.replaceable and waiting is not None and waiting not in self._replacements:
            self._replacements.add(waiting)
            log.warning("canary %s gives way to %s (%s)", canary, waiting, judgement.reason)
            self.propose(
                ControlAction.canary, waiting, f"replaces {canary}, {judgement.reason}", actor="canary"
            )
        return judgement
