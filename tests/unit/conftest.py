"""Unit tests: one process, no broker, no Redis, no browser, no server app."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def broker() -> None:
    pytest.fail(
        "a unit test asked for a Kafka broker (a server app needs one): it belongs in tests/integration"
    )
