"""service/serving_models.py: which version answers a request, with and without a canary."""

from __future__ import annotations

import random

import pytest

from service.canary.assignment import serves_canary
from service.engine.registry import UnknownAdapter
from service.serving_models import ServingModels

SHARE = 0.3
USERS = [f"user-{i}" for i in range(40)]


class Registry:
    """The two things `ServingModels` asks of the adapter registry: the canary, and version -> adapter."""

    def __init__(self, canary: str | None) -> None:
        self.canary, self.canary_share, self.live = canary, SHARE if canary else 0.0, "v1"

    def resolve(self, requested: str) -> str:
        version = requested or self.live
        if version not in ("v1", "v2"):
            raise UnknownAdapter(version)
        return f"adapter-{version}"

    def versions(self) -> list[str]:
        return ["v1", "v2"]


def test_canary_users_get_the_canary_and_the_others_live() -> None:
    models = ServingModels(Registry("v2"), "base-model", compare_share=0.0)
    mine = [u for u in USERS if serves_canary("v2", u, SHARE)]
    assert 0 < len(mine) < len(USERS)
    for user in USERS:
        expected = "adapter-v2" if user in mine else "adapter-v1"
        assert models.answers("thumbtune", 1, user) == [expected]
    assert models.answers("thumbtune", 1, None) == ["adapter-v1"]  # no user: live
    assert models.answers("thumbtune@v1", 1, mine[0]) == ["adapter-v1"]  # a version named: that one


def test_a_canary_users_compare_request_is_always_one_answer_from_each() -> None:
    """All n answers from the canary would cost n of its answers and compare it with nothing."""
    models = ServingModels(Registry("v2"), "base-model", compare_share=0.0)
    for user in USERS:
        answers = models.answers("thumbtune", 2, user)
        if serves_canary("v2", user, SHARE):
            assert sorted(answers) == ["adapter-v1", "adapter-v2"], user
        else:
            assert answers == ["adapter-v1", "adapter-v1"], user
    four = models.answers("thumbtune", 4, next(u for u in USERS if serves_canary("v2", u, SHARE)))
    assert sorted(four) == ["adapter-v1"] * 2 + ["adapter-v2"] * 2


def test_the_compare_share_mixes_that_share_of_the_other_users_requests() -> None:
    random.seed(5)
    models = ServingModels(Registry("v2"), "base-model", compare_share=0.25)
    others = [u for u in USERS if not serves_canary("v2", u, SHARE)]
    mixed = sum(len(set(models.answers("thumbtune", 2, others[i % len(others)]))) == 2 for i in range(4000))
    assert mixed / 4000 == pytest.approx(0.25, abs=0.03)
    canary_user = next(u for u in USERS if u not in others)
    orders = {tuple(models.answers("thumbtune", 2, canary_user)) for _ in range(50)}
    assert len(orders) == 2  # a canary user's two answers come in either order, not saying which is which


def test_without_a_canary_nothing_is_mixed() -> None:
    models = ServingModels(Registry(None), "base-model", compare_share=1.0)
    assert models.answers("thumbtune", 2, "user-1") == ["adapter-v1", "adapter-v1"]
