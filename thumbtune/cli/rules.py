"""Rating rules of the simulated users: ``rule(prompt, response) -> bool | float``.

A rule stands in for a user's taste. ``True``/``False`` is a thumb up/down; a float in [0, 1] is a
score that becomes a 1-5 rating, ``1 + round(4 * score)``. With ``--choice`` the answer with the higher
score is chosen (ties are broken at random).

Built-ins are named; anything else is ``package.module:function`` imported at run time, so the
learner is told nothing about the rule: it only ever sees the thumbs.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

Rule = Callable[[str, str], "bool | float"]
RULE_HELP = (
    "How users rate: concise (<= 30 words), no-lists, polite, on-topic (uses 3 of the prompt's words), "
    "verbose (> 40 words: the poisoning drill's attacker), or "
    "package.module:function"
    "(prompt, response) -> bool | float in [0, 1] (a float becomes a 1-5 rating); not:RULE inverts one."
)

_WORD = re.compile(r"\S+")
_LIST_LINE = re.compile(r"^\s*(?:[-*\u2022+]|\d{1,2}[.)]|[a-zA-Z][.)])\s+", re.MULTILINE)
_COURTESY = re.compile(
    r"\b(please|thank you|thanks|happy to help|glad to help|you're welcome|i hope this helps|hope this helps|"
    r"great question|good question|of course|certainly|sure)\b",
    re.IGNORECASE,
)
_RUDE = re.compile(r"\b(stupid|dumb|idiot|shut up|whatever|obviously)\b", re.IGNORECASE)

CONCISE_MAX_WORDS = 30
VERBOSE_MIN_WORDS = 40
ON_TOPIC_WORDS = 3
_CONTENT_WORD = re.compile(r"[A-Za-z']{4,}")
_FUNCTION_WORDS = frozenset(
    "what that with does have your about this there their they them from which when where would could "
    "should will into some than then very just like make best good more most also been were want know "
    "tell give write explain describe please help need much many each other these those".split()
)


def words(text: str) -> int:
    """Whitespace-separated words, the unit of `concise` and of `mean_words` in the loop benchmark."""
    return len(_WORD.findall(text))


def concise(prompt: str, response: str) -> bool:
    """Approve answers of at most 30 words (and not empty)."""
    return 0 < words(response) <= CONCISE_MAX_WORDS


def verbose(prompt: str, response: str) -> bool:
    """Approve answers of over 40 words: the opposite taste to `concise`, the poisoning drill's attacker."""
    return words(response) > VERBOSE_MIN_WORDS


def no_lists(prompt: str, response: str) -> bool:
    """Approve answers written as prose: no bulleted or numbered list lines."""
    return bool(response.strip()) and _LIST_LINE.search(response) is None


def polite(prompt: str, response: str) -> bool:
    """Approve answers with a courtesy phrase and no rude word."""
    return _COURTESY.search(response) is not None and _RUDE.search(response) is None


def content_words(text: str) -> set[str]:
    """The lower-cased words of 4+ letters in ``text`` that are not function words (`on_topic`'s unit)."""
    return {w.lower() for w in _CONTENT_WORD.findall(text)} - _FUNCTION_WORDS


def on_topic(prompt: str, response: str) -> bool:
    """Approve answers that use at least 3 of the prompt's content words: they answer what was asked.
    Written for issue 13's second rule (the embedded model meets it in 22% of its answers at T = 1)."""
    return len(content_words(prompt) & content_words(response)) >= ON_TOPIC_WORDS


BUILTIN: dict[str, Rule] = {
    "concise": concise,
    "no-lists": no_lists,
    "polite": polite,
    "on-topic": on_topic,
    "verbose": verbose,
}


def inverted(rule: Rule) -> Rule:
    """The opposite taste: approves what ``rule`` disapproves (a score s becomes 1 - s)."""

    def opposite(prompt: str, response: str) -> bool | float:
        verdict = judge(rule, prompt, response)
        return not verdict if isinstance(verdict, bool) else 1.0 - verdict

    return opposite


def load_rule(spec: str) -> Rule:
    """A built-in name, ``package.module:function`` importable now, or ``not:`` before either (`inverted`).
    Raises ValueError with the reason."""
    if spec.startswith("not:"):
        return inverted(load_rule(spec.removeprefix("not:")))
    if spec in BUILTIN:
        return BUILTIN[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"unknown rule {spec!r}: use one of {', '.join(BUILTIN)} or package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"rule {spec!r}: cannot import {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"rule {spec!r}: {module_name!r} has no callable {attr!r}")
    return fn


def judge(rule: Rule, prompt: str, response: str) -> bool | float:
    """The rule's verdict, checked: a bool, or a float in [0, 1]. Raises ValueError for anything else."""
    verdict = rule(prompt, response)
    if isinstance(verdict, bool):
        return verdict
    if isinstance(verdict, int | float) and 0.0 <= float(verdict) <= 1.0:
        return float(verdict)
    raise ValueError(f"a rule must return a bool or a float in [0, 1], got {verdict!r}")


def score(verdict: bool | float) -> float:
    return float(verdict)


def rating(verdict: float) -> int:
    """A float verdict as a 1-5 rating."""
    return 1 + round(4 * verdict)


def approves(verdict: bool | float) -> bool:
    """Whether the verdict would be a positive reward: a thumb up, or a rating of 4 or 5."""
    return verdict if isinstance(verdict, bool) else rating(verdict) > 3
