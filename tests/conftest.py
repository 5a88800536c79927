"""Shared fixtures: a tiny random Llama with the real tokenizer, settings, a running app, a real broker.

Most tests run on the tiny model (fast); tests marked `slow` use the real embedded model.
The broker fixture (tests/broker_fixtures.py) starts one Tansu broker per session on a free port.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.broker_fixtures import broker, consume_all  # noqa: F401 - re-exported fixtures
from thumbtune.settings import Settings

USER_CACHE = Path(os.environ.get("THUMBTUNE_TEST_CACHE", "~/.cache/thumbtune")).expanduser()


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The embedded model's converted cache (built once per machine, ~20 s): its tokenizer is real."""
    from thumbtune.base_model import embedded_tokenizer_dir

    return embedded_tokenizer_dir(Settings(cache_dir=USER_CACHE))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 2-layer random Llama over SmolLM2's vocabulary, saved as an HF directory."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.config._name_or_path = "thumbtune-tests/tiny-llama"
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def settings_factory(tmp_path: Path, tiny_model_dir: Path, broker):  # noqa: ANN001, ANN201, F811
    """Settings for a test server on the tiny model and the session broker; keyword overrides win."""

    def make(**overrides: object) -> Settings:
        values: dict = dict(
            model=str(tiny_model_dir),
            cache_dir=tmp_path / "cache",
            spool_dir=tmp_path / "spool",
            kafka_bootstrap_servers=broker.bootstrap,
            max_context=512,
            max_tokens_cap=256,
            default_max_tokens=16,
            num_threads=0,
        )
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def client_factory(settings_factory):  # noqa: ANN001, ANN201
    """Start an app (lifespan included) under a TestClient; everything is shut down after the test."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    clients: list[TestClient] = []

    def make(**overrides: object) -> TestClient:
        client = TestClient(create_app(settings_factory(**overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(client_factory) -> Iterator:  # noqa: ANN001
    return client_factory()


class LiveServer:
    """uvicorn in a background thread on a free 127.0.0.1 port: a real HTTP server for real clients."""

    def __init__(self, app, port: int) -> None:  # noqa: ANN001
        import uvicorn

        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))

    def __enter__(self) -> LiveServer:
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def live_server_factory(settings_factory):  # noqa: ANN001, ANN201
    from service.app import create_app
    from thumbtune.broker import free_port

    servers: list[LiveServer] = []

    def make(**overrides: object) -> LiveServer:
        server = LiveServer(create_app(settings_factory(**overrides)), free_port()).__enter__()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.__exit__(None, None, None)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One torch thread for the test: the tiny model's matmuls are too small for intra-op threads to pay,
    and on 2 shared cores they cost 10x. Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
