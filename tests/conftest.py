"""Shared fixtures: the tiny model, settings, running apps and servers, brokers, thread pinning.

Most tests run on a tiny random Llama with the real tokenizer (fast); tests marked `slow` use the real
embedded model. Tests are arranged by kind (tests/README.md); the fixtures here serve them all, and a
folder's conftest only changes what a kind needs (unit tests reach no broker).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
import uvicorn
from fastapi.testclient import TestClient
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from service.app import create_app
from tests.support import USER_CACHE
from tests.support.kafka import TEST_BROKER_STOP_GRACE_S, ConsumeAll, own_broker, read_topic
from thumbtune.cli.broker import EmbeddedBroker
from thumbtune.cli.process import free_port
from thumbtune.core.base_model import embedded_tokenizer_dir
from thumbtune.core.kafka import ensure_topics, topic_partitions
from thumbtune.core.settings import Settings

# --- models -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The embedded model's converted cache (built once per machine, ~20 s): its tokenizer is real."""
    return embedded_tokenizer_dir(Settings(cache_dir=USER_CACHE))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 2-layer random Llama over SmolLM2's vocabulary, saved as an HF directory."""
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
def single_thread() -> Iterator[None]:
    """One torch thread for the test: the tiny model's matmuls are too small for intra-op threads to pay,
    and on 2 shared cores they cost 10x. Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def own_rng() -> Iterator[None]:
    """torch's global RNG as it was before the test, afterwards (for tests that seed it themselves)."""
    with torch.random.fork_rng():
        yield


# --- Kafka --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """An embedded broker on a free port with thumbtune's topics, shared by the whole session."""
    log_file = tmp_path_factory.mktemp("broker") / "tansu.log"
    b = EmbeddedBroker(port=free_port(), log_file=log_file).start()
    try:
        ensure_topics(b.bootstrap, topic_partitions(Settings()))
        yield b
    finally:
        b.stop(grace=TEST_BROKER_STOP_GRACE_S)


@pytest.fixture
def kafka(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[EmbeddedBroker]:
    """A broker of the test's own (`own_broker`): for tests that read whole topics or consume in a group
    from the start. ``@pytest.mark.feedback_partitions(n)`` sets thumbtune.feedback's partitions (1)."""
    marker = request.node.get_closest_marker("feedback_partitions")
    with own_broker(tmp_path, feedback_partitions=marker.args[0] if marker else 1) as b:
        yield b


@pytest.fixture(scope="session")
def consume_all() -> ConsumeAll:
    """``consume_all(bootstrap, topic, expected, timeout=30)``: see `tests.support.kafka.read_topic`."""
    return read_topic


@pytest.fixture
def kafka_bootstrap(broker: EmbeddedBroker) -> str:
    """Where test servers publish ratings: the session broker (tests/unit/conftest.py: nowhere)."""
    return broker.bootstrap


# --- Redis --------------------------------------------------------------------------------------------

REDIS_URL = os.environ.get("THUMBTUNE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis the tests share (THUMBTUNE_TEST_REDIS_URL); without one, a test that needs it is skipped,
    loudly."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1).ping()
    except redis.RedisError as exc:
        pytest.skip(
            f"NO REDIS at {REDIS_URL} ({exc}): start redis-server or set THUMBTUNE_TEST_REDIS_URL; "
            "the shared completion store and rate limits are untested here"
        )
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of the test's own, deleted afterwards."""
    prefix = f"thumbtune-test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


# --- servers --------------------------------------------------------------------------------------------


def tiny_settings(root: Path, model_dir: Path, kafka_bootstrap: str, **overrides: object) -> Settings:
    """A test server's settings on the tiny model, its files under ``root``; keyword overrides win."""
    values: dict = dict(
        model=str(model_dir),
        cache_dir=root / "cache",
        spool_dir=root / "spool",
        kafka_bootstrap_servers=kafka_bootstrap,
        max_context=512,
        max_tokens_cap=256,
        default_max_tokens=16,
        num_threads=0,
        canary_share=0.0,  # versions go live as announced; tests of the canary stage turn it on
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings_factory(
    tmp_path: Path, tiny_model_dir: Path, kafka_bootstrap: str, request: pytest.FixtureRequest
):  # noqa: ANN201
    """Settings for a test server on the tiny model; keyword overrides win.

    A test that takes its own `kafka` broker gets it started here, before any server or client, whatever
    the order of its arguments: fixtures stop in reverse, so its servers stop while their broker still
    answers. (A test that named `kafka` after `live_server_factory` had its broker stopped first: the
    servers' clients then retried a refused broker on the way out, ~4 s of teardown per test.)"""
    if "kafka" in request.fixturenames:
        request.getfixturevalue("kafka")

    def make(**overrides: object) -> Settings:
        return tiny_settings(tmp_path, tiny_model_dir, kafka_bootstrap, **overrides)

    return make


@pytest.fixture
def client_factory(settings_factory):  # noqa: ANN001, ANN201
    """Start an app (lifespan included) under a TestClient; everything is shut down after the test."""
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


@pytest.fixture(scope="module")
def shared_client(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, broker: EmbeddedBroker
) -> Iterator[TestClient]:
    """One app with `client`'s settings for a whole module, for tests whose requests change nothing another
    test reads (refused requests, unknown names, answers nobody rates): a start and a stop per module instead
    of per test (~0.9 s each on 2 cores). Tests that rate, publish or count keep a `client` of their own."""
    root = tmp_path_factory.mktemp("shared-server")
    with TestClient(create_app(tiny_settings(root, tiny_model_dir, broker.bootstrap))) as client:
        yield client


class LiveServer:
    """uvicorn in a background thread on a free 127.0.0.1 port: a real HTTP server for real clients."""

    def __init__(self, app, port: int) -> None:  # noqa: ANN001
        self.app = app
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))

    @property
    def runtime(self):  # noqa: ANN201 - service.runtime.Runtime, once started
        return self.app.state.runtime

    def __enter__(self) -> LiveServer:
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
    servers: list[LiveServer] = []

    def make(**overrides: object) -> LiveServer:
        server = LiveServer(create_app(settings_factory(**overrides)), free_port()).__enter__()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.__exit__(None, None, None)
