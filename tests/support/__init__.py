"""Helpers the tests share (not tests themselves): the repository's root, the model cache, waiting.

kafka      reading and writing topics, a broker of a test's own
learner    the tiny base model, feedback events sampled the way the server records them
adapters   adapter versions written straight into a store; reference log-probs
api        the chat API's request and error shapes
deploy     the operator artefacts: paths, setting and metric names, promtool
loop_rules a rating rule loaded by name, the way users' own rules are
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from thumbtune.cli.process import ChildProcess

ROOT = Path(__file__).resolve().parents[2]
"""The repository."""
USER_CACHE = Path(os.environ.get("THUMBTUNE_TEST_CACHE", "~/.cache/thumbtune")).expanduser()
"""Where the embedded model's converted cache lives (built once per machine)."""


def wait_for(
    condition: Callable[[], object],
    timeout: float = 30,
    what: str = "condition",
    alive: Callable[[], str | None] | None = None,
    poll: float = 0.05,
) -> object:
    """Poll ``condition`` until it returns something truthy, and return that. ``alive()`` names a helper
    process that died (or None while all live): then the wait fails at once with its reason."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        dead = alive() if alive is not None else None
        if dead:
            raise AssertionError(f"{dead} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(poll)


def exited(*children: ChildProcess) -> Callable[[], str | None]:
    """For `wait_for`'s ``alive``: names the first of ``children`` that exited, with its output's tail."""

    def check() -> str | None:
        for child in children:
            if child is not None and child.proc is not None and not child.alive:
                return f"{child.name} exited with {child.returncode}:\n{child.output(3000)}"
        return None

    return check
