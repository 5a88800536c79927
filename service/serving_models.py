"""Every model name this server answers to, what each resolves to, and `/v1/models` (the role of vLLM's
``OpenAIServingModels``):

    thumbtune         the live adapter version (what `thumbtune` means changes with every swap), or for a
                      share of users the canary (service/canary/assignment.py)
    thumbtune@v<N>    a loaded version, by its immutable name
    base              the adapter switched off
"""

from __future__ import annotations

import random
import time

from service.canary.assignment import serves_canary
from service.engine.registry import BASE, AdapterRegistry, UnknownAdapter
from service.errors import APIError
from service.protocol import ModelCard, ModelList

SERVED_NAME = "thumbtune"


def version_name(version: str) -> str:
    """'v3' -> 'thumbtune@v3'."""
    return f"{SERVED_NAME}@{version}"


class ServingModels:
    def __init__(self, registry: AdapterRegistry, root: str, compare_share: float = 0.0) -> None:
        self.registry = registry
        self.root = root
        """The base model's id (a model card's ``root``)."""
        self.compare_share = compare_share
        """THUMBTUNE_CANARY_COMPARE_SHARE."""

    def names(self) -> list[str]:
        """What a request's ``model`` may be right now: the live alias, each loaded version, the base."""
        return [SERVED_NAME, *(version_name(v) for v in self.registry.versions()), BASE]

    def resolve(self, name: str, subject: str | None = None) -> str:
        """The adapter a request for ``name`` by ``subject`` (its user) runs on; 404 (OpenAI's
        model_not_found) for anything else."""
        try:
            if name == SERVED_NAME:
                canary, share = self.registry.canary, self.registry.canary_share
                if canary is not None and serves_canary(canary, subject, share):
                    try:
                        return self.registry.resolve(canary)
                    except UnknownAdapter:
                        pass  # withdrawn a moment ago: live
                return self.registry.resolve("")
            if name == BASE:
                return BASE
            if name.startswith(SERVED_NAME + "@"):
                return self.registry.resolve(name.split("@", 1)[1])
        except UnknownAdapter:
            pass
        raise APIError(
            404,
            f"model {name!r} does not exist or is not loaded; available: {', '.join(self.names())}",
            param="model",
            code="model_not_found",
        )

    def answers(self, name: str, n: int, subject: str | None = None) -> list[str]:
        """The adapter of each of a request's ``n`` answers. Mostly one version for all; while there is a
        canary, a compare request (``n`` >= 2 for ``thumbtune``) gets half its answers from live and half
        from the canary, in random order, so the user's choice compares the two versions: always when
        the user is one of the canary's, else for a share of the requests. (All n from the canary would
        cost a canary user's request n of its answers and say nothing about it against live.)"""
        canary, share = self.registry.canary, self.registry.canary_share
        if (
            name == SERVED_NAME
            and n >= 2
            and canary is not None
            and (serves_canary(canary, subject, share) or random.random() < self.compare_share)
        ):
            try:
                versions = [self.registry.resolve(""), self.registry.resolve(canary)] * n
            except UnknownAdapter:
                pass  # withdrawn a moment ago
            else:
                mixed = versions[:n]
                random.shuffle(mixed)
                return mixed
        return [self.resolve(name, subject)] * n

    def list(self) -> ModelList:
        now = int(time.time())
        cards = [ModelCard(id=SERVED_NAME, created=now, root=self.root, adapter_version=self.registry.live)]
        cards += [
            ModelCard(id=version_name(v), created=now, root=self.root, adapter_version=v)
            for v in self.registry.versions()
        ]
        cards.append(ModelCard(id=BASE, created=now, root=self.root, adapter_version=None))
        return ModelList(data=cards)
