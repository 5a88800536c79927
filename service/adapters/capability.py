"""The capability gate: before a version may serve, it answers checkable prompts as well as live does.

Approval alone can be won by flattering users (a version that agrees with everyone is rated up), so
beside the KL probe a new version answers the capability probe (thumbtune/core/capability.py) greedily,
through the engine like any request (its sequences share batches with users' requests), and so does the
live version (cached: each version answers once). A *loss* is an item live answers right and the new
version wrong; more than THUMBTUNE_ADAPTER_CAPABILITY_MAX_LOSSES losses refuse the version (reason
``capability``). Items the live version gets wrong cost nothing, so a version is never refused for what the
base could not do either.
"""

from __future__ import annotations

import threading

from transformers import PreTrainedTokenizerBase

from service.adapters.checks import Refused
from service.engine.engine import Engine, Sequence, TokenEvent
from thumbtune.core.capability import CapabilityItem, load_capability
from thumbtune.core.chat import encode_chat, user_turn
from thumbtune.core.contract import SamplingParams
from thumbtune.core.settings import Settings

ANSWER_TIMEOUT_S = 120.0
IN_FLIGHT = 2
"""Capability sequences in the engine at once."""


class CapabilityGate:
    def __init__(self, settings: Settings, engine: Engine, tokenizer: PreTrainedTokenizerBase) -> None:
        self.settings = settings
        self.engine = engine
        self.items: list[CapabilityItem] = load_capability()[: settings.adapter_capability_prompts]
        self._prompts = [encode_chat(tokenizer, user_turn(item.prompt)) for item in self.items]
        self._right: dict[str, list[bool]] = {}
        """version -> which items it answered right (versions are immutable, so this never goes stale)."""

    def check(self, version: str, live: str) -> tuple[int, int]:
        """Refused('capability') if ``version`` loses too many items to ``live``; else (its right, live's)."""
        if not self.items:
            return 0, 0
        mine, theirs = self.right(version), self.right(live)
        losses = [item.id for item, new, old in zip(self.items, mine, theirs, strict=True) if old and not new]
        limit = self.settings.adapter_capability_max_losses
        if len(losses) > limit:
            raise Refused(
                "capability",
                f"{version} answers {sum(mine)} of {len(self.items)} checkable prompts right, live {live} "
                f"{sum(theirs)}: it gets {len(losses)} wrong that live gets right ({', '.join(losses)}) > "
                f"THUMBTUNE_ADAPTER_CAPABILITY_MAX_LOSSES = {limit}",
            )
        return sum(mine), sum(theirs)

    def right(self, version: str) -> list[bool]:
        """Greedy answers of ``version`` (a published version, 'base', or the live one) to every item."""
        if version not in self._right:
            texts = self._answers(version)
            self._right[version] = [item.passes(text) for item, text in zip(self.items, texts, strict=True)]
        return self._right[version]

    def _answers(self, version: str) -> list[str]:
        """Greedy answers, at most IN_FLIGHT at a time: each new sequence's prefill shares an engine step
        with users' decoding, so a burst of them would stall users' streams."""
        params = SamplingParams(
            temperature=0.0, top_p=1.0, max_tokens=self.settings.adapter_capability_max_tokens
        )
        free = threading.Semaphore(IN_FLIGHT)
        errors: list[str] = []

        def emit(event: TokenEvent) -> None:
            if event.finish_reason is not None:
                if event.error:
                    errors.append(event.error)
                free.release()

        seqs: list[Sequence] = []
        for prompt in [*self._prompts, *[None] * IN_FLIGHT]:
            if not free.acquire(timeout=ANSWER_TIMEOUT_S):
                raise Refused("load_error", f"the capability probe of {version} did not finish in time")
            if prompt is None:
                continue  # draining: the last ones have finished once all IN_FLIGHT slots are back
            seqs.append(Sequence(prompt_ids=prompt, params=params, emit=emit, adapter=version))
            try:
                self.engine.submit(seqs[-1])
            except RuntimeError as exc:  # the engine is stopping: try the version again later
                raise Refused("load_error", f"the capability probe could not run: {exc}", retry=True) from exc
        if errors:
            raise Refused("load_error", f"the capability probe of {version} failed: {errors[0]}")
        return [seq.text for seq in seqs]
