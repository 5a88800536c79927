"""A rule for the loop test, loaded the way users' own rules are: ``tests.support.loop_rules:contains_target``

The test picks TARGET from what the tiny model actually says (a piece of text in a minority of its
answers), so the reward is learnable but far from satisfied at the start.
"""

from __future__ import annotations

TARGET: str | None = None


def contains_target(prompt: str, response: str) -> bool:
    if TARGET is None:
        raise RuntimeError("set tests.support.loop_rules.TARGET first")
    return TARGET in response


def shorter(prompt: str, response: str) -> float:
    """A score in (0, 1]: the shorter the answer, the better (a ranking rule with few ties)."""
    return 1 / (1 + len(response))
