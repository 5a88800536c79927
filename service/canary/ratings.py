"""Ratings per version, folded from the feedback stream: the figures canary decisions are made on.

Every replica folds the whole of ``thumbtune.feedback`` (every replica's ratings, the source of truth)
into one `VersionRatings`, so the tallies survive restarts and are the same wherever you ask, up to
how far each replica has read.

Two kinds of evidence:

approval     per version, thumbs and 1-5 ratings and how many approved (reward > 0), in one-minute
             buckets of the time the answer was given, so a canary is compared with what the live version
             earned *while the canary ran* (`approval(version, since)`), not with its whole history. A
             choice or a ranking says which answer is better, not whether any is good, so it counts here not
             at all (between two answers of one version, half of its "approvals" would be noise: measured
             in the canary drill, it pulled a bad version's approval from 8% to 32%)
head-to-head per pair of versions, wins, losses and ties, from choices and rankings whose answers came
             from different versions (compare mode mixes live and canary): the user's choice is then a
             direct comparison of the versions. A choice's events are joined by response id (the rejected
             answer's event names the chosen one), a ranking's by its id (all K places); the events of one
             rating may arrive in any order, from any partition.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, defaultdict
from dataclasses import dataclass

from service.canary.arena import Comparison
from thumbtune.core.contract import FeedbackEvent, FeedbackKind

BUCKET_S = 60
MAX_PENDING = 10_000
"""Ratings waiting for their other half (a choice's chosen answer, a ranking's other places); the oldest
are dropped past this (a rating whose other events never arrive)."""


@dataclass(frozen=True)
class Approval:
    ratings: int
    approvals: int

    @property
    def rate(self) -> float | None:
        return self.approvals / self.ratings if self.ratings else None


@dataclass(frozen=True)
class HeadToHead:
    """Comparisons of ``a`` against ``b``: a's wins and losses (a choice or ranking has no ties)."""

    a: str
    b: str
    wins: int
    losses: int

    @property
    def comparisons(self) -> int:
        return self.wins + self.losses


class VersionRatings:
    def __init__(self) -> None:
        self._buckets: dict[str, dict[int, list[int]]] = defaultdict(dict)
        """version -> bucket (answered_at // BUCKET_S) -> [ratings, approvals]."""
        self._pairs: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        """(a, b) in sorted order -> [a's wins, b's wins]."""
        self._chosen: OrderedDict[str, tuple[str, float]] = OrderedDict()
        """response id of a chosen answer -> (its version, when it was answered)."""
        self._waiting: OrderedDict[str, list[tuple[str, float]]] = OrderedDict()
        """chosen response id not seen yet -> the rejected answers waiting for it: (version, answered_at)."""
        self._rankings: OrderedDict[str, dict[int, tuple[str, float]]] = OrderedDict()
        """ranking id -> place -> (version, answered_at), until all K places are in."""
        self.events = 0

    # --- folding ----------------------------------------------------------------------------------------

    def add(self, event: FeedbackEvent) -> None:
        self.events += 1
        if event.kind is FeedbackKind.choice:
            self._choice(event)
        elif event.kind is FeedbackKind.ranking:
            self._ranking(event)
        else:  # a thumb or a 1-5 rating: an absolute judgement of one answer
            counts = self._buckets[event.adapter_version].setdefault(
                int(event.answered_at // BUCKET_S), [0, 0]
            )
            counts[0] += 1
            counts[1] += event.reward > 0

    def _choice(self, event: FeedbackEvent) -> None:
        here = (event.adapter_version, event.answered_at)
        if event.value == "chosen":
            self._remember(self._chosen, event.response_id, here)
            for loser, _ in self._waiting.pop(event.response_id, []):
                self._compare(event.adapter_version, loser)
        elif event.paired_response_id is not None:
            chosen = self._chosen.get(event.paired_response_id)
            if chosen is not None:
                self._compare(chosen[0], event.adapter_version)
            else:
                waiting = self._waiting.setdefault(event.paired_response_id, [])
                waiting.append(here)
                self._trim(self._waiting)

    def _ranking(self, event: FeedbackEvent) -> None:
        assert event.ranking_id is not None and event.ranking_size is not None
        places = self._rankings.setdefault(event.ranking_id, {})
        places[int(event.value)] = (event.adapter_version, event.answered_at)
        self._trim(self._rankings)
        if len(places) == event.ranking_size:
            del self._rankings[event.ranking_id]
            ordered = [places[k][0] for k in sorted(places)]
            for better, worse in itertools.combinations(ordered, 2):  # every pair of a ranking (InstructGPT)
                self._compare(better, worse)

    def _compare(self, winner: str, loser: str) -> None:
        if winner == loser:
            return  # both answers from one version: no evidence about versions
        a, b = sorted((winner, loser))
        self._pairs[(a, b)][0 if winner == a else 1] += 1

    def _remember(self, table: OrderedDict, key: str, value: object) -> None:
        table[key] = value
        self._trim(table)

    @staticmethod
    def _trim(table: OrderedDict) -> None:
        while len(table) > MAX_PENDING:
            table.popitem(last=False)

    # --- reading ------------------------------------------------------------------------------------------

    def approval(self, version: str, since: float = 0.0) -> Approval:
        """Ratings and approvals of ``version``'s answers given at ``since`` or later (whole minutes)."""
        first = int(since // BUCKET_S)
        ratings = approvals = 0
        for bucket, (r, a) in self._buckets.get(version, {}).items():
            if bucket >= first:
                ratings, approvals = ratings + r, approvals + a
        return Approval(ratings, approvals)

    def versions(self) -> list[str]:
        return list(self._buckets)

    def head_to_head(self, a: str, b: str) -> HeadToHead:
        first, second = sorted((a, b))
        wins_first, wins_second = self._pairs.get((first, second), (0, 0))
        if a == first:
            return HeadToHead(a, b, wins_first, wins_second)
        return HeadToHead(a, b, wins_second, wins_first)

    def comparisons(self) -> list[Comparison]:
        """Every head-to-head comparison seen, one per user choice: what `arena.fit_ratings` takes."""
        out: list[Comparison] = []
        for (a, b), (wins_a, wins_b) in self._pairs.items():
            out += [Comparison(a, b)] * wins_a + [Comparison(b, a)] * wins_b
        return out
