"""Unit tests: in one process, no broker, no Redis, no browser."""

from __future__ import annotations

import pytest

from thumbtune.cli.process import free_port


@pytest.fixture
def kafka_bootstrap() -> str:
    """Unit tests reach no broker: a port nothing listens on, so their ratings wait in the spool."""
    return f"127.0.0.1:{free_port()}"
