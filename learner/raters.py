"""Rater influence limits: no one rater steers what everyone is served.

A rater is whoever sent a rating: its API key (``FeedbackEvent.api_key_id``), or the request's ``user`` field
when the operator trusts it (``rater_identity = "user"``: a front end that authenticates its users and sets
the field; a rating without one counts as its key's). Ratings with neither come from one anonymous rater.

Capped shares, by water-filling. Raters r = 1..K gave amounts n_r (ratings, or ratings already scaled down).
With cap c, rater r keeps the amount

    a_r = min(n_r, L),   where the level L solves   L = c' * sum_s min(n_s, L),   c' = max(c, 1/K)

so no rater's share of the total, a_r / sum_s a_s, exceeds c'; raters under the level keep all of theirs, and
every rater over it is held to exactly L. Below c = 1/K no amounts keep every share under c, and the closest
is equal shares (hence c'). With j raters over the level and S_j the sum of the others' amounts,
L = c' S_j / (1 - j c') (`capped_amounts`). c >= 1 turns the cap off.

Two scopes, one cap:
  window   the newest ``window`` human ratings trained on, this update's included: g_r = a_r^W / n_r^W
  update   this update's ratings, each rater's amount already scaled by its window factor: amounts g_r n_r
and rating i of rater r weighs u_i = min(g_r n_r, L) / n_r, so a rater over the cap in either scope is held
to it. Example: 4 raters with 4 ratings each and one with 16 in a batch of 32, cap 0.2: L = 0.2 * 16 / 0.8 =
4, so the heavy rater's ratings weigh 1/4 each and its share is 4 / 20 = 20% instead of 50%.

Where the weights act: the PPO surrogate of rating i is multiplied by u_i beside its importance weight
(learner/update.py), and the reward model's bootstrap weights of rating i by u_i (learner/reward_model.py).
Down-weighted, not deferred: every rating is still trained in the update it arrived for, so exactly-once
accounting is untouched; the trade-off is that a heavy rater's ratings still fill batch slots, so the policy
takes more (smaller-signal) updates per honest rating, and its KL budget is shared with them.

Per-rater normalisation (``normalise``, off by default): the policy's reward of rating i becomes

    R_i' = (R_i - m_r) / s_r,   m_r = (n_r mean_r + k mean) / (n_r + k),
                                s_r^2 = max((n_r var_r + k var) / (n_r + k), s_min^2)

with rater r's mean and variance over the window, shrunk toward the whole window's with k pseudo-ratings: a
rater who approves everything says little (R' -> 0 as their ratings pile up), a harsh one is heard when they
approve. Choices and
rankings are centred per comparison already, so it changes them little. The reward model still learns from
the labels themselves.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass

from thumbtune.core.contract import FeedbackEvent

ANONYMOUS = "anonymous"
"""The rater of ratings without an API key (or trusted ``user``)."""
SHRINK_K = 8.0
"""k: pseudo-ratings at the window's moments in each rater's normalisation."""
MIN_STD = 0.1
"""s_min: no rater's spread is taken as smaller (a rater who always says the same is not amplified)."""


def rater_of(event: FeedbackEvent, identity: str = "key") -> str:
    """Who rated ``event``: its ``user`` when ``identity`` is 'user' and it has one, else its API key id."""
    if identity == "user" and event.user:
        return f"user:{event.user}"
    return f"key:{event.api_key_id}" if event.api_key_id else ANONYMOUS


def capped_amounts(amounts: dict[str, float], cap: float) -> dict[str, float]:
    """a_r = min(n_r, L) for every rater, with the level L of the module's water-filling (cap c)."""
    k = len(amounts)
    if k == 0:
        return {}
    c = max(cap, 1 / k)
    if c >= 1:
        return dict(amounts)
    values = sorted(amounts.values(), reverse=True)
    level = values[-1]  # c' = 1/K exactly, with every rater over: equal shares
    for j in range(0, k):  # j raters over the level
        if 1 - j * c <= 1e-12:
            break
        candidate = c * sum(values[j:]) / (1 - j * c)
        if (j == 0 or values[j - 1] >= candidate) and values[j] <= candidate:
            level = candidate
            break
    return {r: min(n, level) for r, n in amounts.items()}


def top_share(amounts: dict[str, float]) -> float:
    """The largest rater's share of the total (nan with no ratings)."""
    total = sum(amounts.values())
    return max(amounts.values()) / total if total > 0 else math.nan


@dataclass(frozen=True)
class Limited:
    """One update's ratings after the limits: a weight and a (maybe normalised) reward per event."""

    weights: list[float]
    rewards: list[float]
    diagnostics: dict[str, float]


class RaterWindow:
    """The newest ``size`` human ratings trained on, as (rater, reward), oldest first (learner state)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: deque[tuple[str, float]] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, rated: Iterable[tuple[str, float]]) -> None:
        self.entries.extend(rated)

    def counts(self) -> Counter[str]:
        return Counter(rater for rater, _ in self.entries)

    def moments(self, rater: str | None = None) -> tuple[int, float, float]:
        """(n, mean, population variance) of the rewards of ``rater`` (None: of everyone) in the window."""
        rewards = [r for who, r in self.entries if rater is None or who == rater]
        if not rewards:
            return 0, 0.0, 0.0
        mean = sum(rewards) / len(rewards)
        return len(rewards), mean, sum((r - mean) ** 2 for r in rewards) / len(rewards)

    def normalised(self, rater: str, reward: float) -> float:
        """R' = (R - m_r) / s_r, with the rater's moments shrunk toward the window's (module docstring)."""
        n, mean, var = self.moments(rater)
        _, mean_all, var_all = self.moments()
        m = (n * mean + SHRINK_K * mean_all) / (n + SHRINK_K)
        s2 = max((n * var + SHRINK_K * var_all) / (n + SHRINK_K), MIN_STD**2)
        return (reward - m) / math.sqrt(s2)

    def state_dict(self) -> list[list]:
        return [[rater, reward] for rater, reward in self.entries]

    def load_state_dict(self, state: list[list]) -> None:
        self.entries = deque(((str(r), float(x)) for r, x in state), maxlen=self.size)


def limit(
    events: list[FeedbackEvent],
    window: RaterWindow,
    *,
    cap: float,
    identity: str = "key",
    normalise: bool = False,
) -> Limited:
    """Add ``events`` (one update's human ratings) to ``window`` and weigh them under the cap in both scopes
    (and normalise their rewards per rater if asked); diagnostics as ``raters.*``."""
    raters = [rater_of(e, identity) for e in events]
    window.add(zip(raters, (e.reward for e in events), strict=True))
    in_window = window.counts()
    window_kept = capped_amounts(dict(in_window), cap)
    factor = {r: window_kept[r] / n for r, n in in_window.items()}
    counts = Counter(raters)
    amounts = {r: factor[r] * n for r, n in counts.items()}
    kept = capped_amounts(amounts, cap)
    per_rating = {r: kept[r] / counts[r] for r in counts}
    weights = [per_rating[r] for r in raters]
    rewards = (
        [window.normalised(r, e.reward) for r, e in zip(raters, events, strict=True)]
        if normalise
        else [e.reward for e in events]
    )
    diagnostics = {
        "raters.update": float(len(counts)),
        "raters.window": float(len(in_window)),
        "raters.top_share": top_share(dict(counts)),
        "raters.top_share_capped": top_share(kept),
        "raters.window_top_share": top_share(dict(in_window)),
        "raters.window_top_share_capped": top_share(window_kept),
        "raters.capped": float(sum(1 for r in counts if per_rating[r] < 1 - 1e-9)),
        "raters.weight_removed": float(sum(1 - w for w in weights)),
    }
    return Limited(weights, rewards, diagnostics)
