"""THUMBTUNE_ENGINE=vllm on the embedded model: chat and streaming through vLLM, rated answers' events with
vLLM's token ids and log-probs, a hot-swap through vLLM with its proof, and a refused proof.

One vLLM server (`thumbtune/cli/vllm.py`, from ``.venv-vllm``: `make install-vllm`) and one thumbtune server
in front of it serve the whole module. Without vLLM the module is skipped with the reason, loudly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from service.app import create_app
from service.engine import registry as registry_module
from service.engine.vllm import VERSION_PREFIX
from tests.conftest import LiveServer
from tests.support import USER_CACHE, wait_for
from tests.support.adapters import VersionWriter
from tests.support.kafka import feedback_events
from thumbtune.cli.process import ChildProcess, free_port
from thumbtune.cli.vllm import VLLMNotInstalled, vllm_command, vllm_python
from thumbtune.core.settings import Settings
from thumbtune.core.store import LocalAdapterStore

pytestmark = pytest.mark.broker
TOKEN = "admin-vllm"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Iterator[str]:
    """A vLLM server for the embedded model on a free port (~40 s to start on 2 cores)."""
    settings = Settings(cache_dir=USER_CACHE, vllm_port=free_port(), vllm_max_loras=2)
    try:
        python = vllm_python(settings)
    except VLLMNotInstalled as exc:
        pytest.skip(f"NO vLLM, so the vLLM engine is untested here: {exc}")
    argv, env = vllm_command(settings, python)
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    child = ChildProcess("vllm", argv, env=env, log=log).start()
    url = f"http://127.0.0.1:{settings.vllm_port}"
    try:
        child.wait_http(f"{url}/v1/models", 600)
        yield url
    finally:
        child.stop(grace=20)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> LocalAdapterStore:
    return LocalAdapterStore(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def writer(tokenizer_dir: Path) -> VersionWriter:
    """Versions of a LoRA over the embedded model (the one vLLM serves)."""
    return VersionWriter(tokenizer_dir)


@pytest.fixture(scope="module")
def server(
    vllm_server: str, store: LocalAdapterStore, broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("server")
    settings = Settings(
        cache_dir=USER_CACHE,
        engine="vllm",
        vllm_url=vllm_server,
        adapter_store=str(store.root),
        adapter_follow=False,
        admin_token=TOKEN,
        spool_dir=tmp / "spool",
        kafka_bootstrap_servers=broker.bootstrap,
        max_context=1024,
        canary_share=0.0,
    )
    with LiveServer(create_app(settings), free_port()) as live:
        yield live


def served_models(vllm_url: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{vllm_url}/v1/models").json()["data"]}


def vllm_requests(vllm_url: str) -> float:
    """Requests vLLM has finished, from its own metrics."""
    text = httpx.get(f"{vllm_url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total")
    )


def proof_logprobs(server: LiveServer, vllm_url: str, model: str) -> list[float]:
    """vLLM's log-probs of the proof answer's tokens under ``model``."""
    engine = server.runtime.engine
    ids = engine._proof_ids
    body = {"model": model, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0}
    positions = httpx.post(f"{vllm_url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    return [pos[str(t)]["logprob"] for pos, t in zip(positions["prompt_logprobs"][1:], ids[1:], strict=True)]


def admin(server: LiveServer, action: str, **body: object) -> httpx.Response:
    return httpx.post(f"{server.url}/admin/adapters/{action}", headers=ADMIN, json=body or None, timeout=120)


def test_chat_and_streaming_through_vllm_with_the_openai_client(server: LiveServer, vllm_server: str) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    before = vllm_requests(vllm_server)
    completion = client.chat.completions.create(
        model="thumbtune",
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=12,
        n=2,
        logprobs=True,
        seed=5,
    )
    assert len(completion.choices) == 2
    for choice in completion.choices:
        assert choice.finish_reason in ("stop", "length")
        assert choice.logprobs is not None and all(t.logprob <= 0 for t in choice.logprobs.content)
    assert completion.usage.completion_tokens == sum(len(c.logprobs.content) for c in completion.choices)
    stream = client.chat.completions.create(
        model="thumbtune",
        messages=[{"role": "user", "content": "Count from one to ten in words."}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None
    # the same greedy answer straight from vLLM: thumbtune generated through it, token for token
    direct = httpx.post(
        f"{vllm_server}/v1/chat/completions",
        json={
            "model": server.runtime.engine.base_name,
            "messages": [{"role": "user", "content": "Count from one to ten in words."}],
            "max_tokens": 24,
            "temperature": 0,
        },
        timeout=60,
    ).json()
    assert direct["choices"][0]["message"]["content"].startswith(text.strip()[:20])
    assert vllm_requests(vllm_server) >= before + 4  # two answers, the stream, the direct one
    # a stop string ends the answer at the same place as the embedded engine would: before the string
    stopped = client.chat.completions.create(
        model="thumbtune",
        messages=[{"role": "user", "content": "Count from one to ten in words."}],
        max_tokens=24,
        temperature=0,
        stop=[text.split()[2]] if len(text.split()) > 2 else ["\n"],
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert len(stopped.choices[0].message.content) < len(text)


def test_a_rated_answer_carries_vllms_token_ids_and_logprobs(server: LiveServer, broker) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.create(
        model="thumbtune",
        messages=[{"role": "user", "content": "Give me a tip for learning French."}],
        max_tokens=16,
        temperature=0.8,
        seed=11,
    )
    rated = httpx.post(f"{server.url}/v1/feedback", json={"response_id": completion.id, "thumb": "up"})
    assert rated.status_code == 202, rated.text
    # the 202 comes before the producer has sent it: flush the server's publisher, then read the topic
    event = feedback_events(server.runtime.publisher, broker.bootstrap, {completion.id}, 1)[completion.id]
    assert event.engine == "vllm" and event.adapter_version == "v0"
    assert len(event.response_token_ids) == completion.usage.completion_tokens
    assert server.runtime.tokenizer.decode(event.response_token_ids, skip_special_tokens=True).startswith(
        completion.choices[0].message.content
    )
    # vLLM's log-probs are the contract's: log_softmax(z / T) of this server's own copy on the same tokens
    model = server.runtime.adapters.model
    ids = torch.tensor([event.prompt_token_ids + event.response_token_ids])
    with model.disable_adapter(), torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(event.prompt_token_ids) - 1 : -1].float()
    mine = torch.log_softmax(logits / event.sampling.logprob_temperature, dim=-1)
    mine = mine.gather(1, torch.tensor(event.response_token_ids)[:, None]).squeeze(1)
    diff = (mine - torch.tensor(event.behaviour_logprobs)).abs()
    assert float(diff.max()) < 1e-3, diff


def test_hot_swap_through_vllm_with_the_proof(
    server: LiveServer, vllm_server: str, store: LocalAdapterStore, writer: VersionWriter, monkeypatch
) -> None:
    monkeypatch.setattr(registry_module, "RESOLVE_GRACE_S", 0.2)
    v1 = writer.write(store, 0.05, seed=1)
    v2 = writer.write(store, 0.05, seed=2)
    pinned = admin(server, "pin", version=v1)
    assert pinned.status_code == 200, pinned.text
    assert f"{VERSION_PREFIX}{v1}" in served_models(vllm_server)
    worst, mean = server.runtime.engine.proofs[v1]
    assert worst <= server.runtime.settings.vllm_proof_max_diff and mean <= worst
    body = {
        "messages": [{"role": "user", "content": "Describe the sea."}],
        "max_tokens": 12,
        "temperature": 0,
    }
    answer = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "thumbtune", **body}, timeout=60)
    assert answer.json()["adapter_version"] == v1
    direct = httpx.post(
        f"{vllm_server}/v1/chat/completions", json={"model": f"{VERSION_PREFIX}{v1}", **body}, timeout=60
    )
    assert (
        answer.json()["choices"][0]["message"]["content"] == direct.json()["choices"][0]["message"]["content"]
    )
    # the proof can tell v1 from the base: their log-probs on the proof answer differ by more than it allows
    moved = max(
        abs(a - b)
        for a, b in zip(
            proof_logprobs(server, vllm_server, f"{VERSION_PREFIX}{v1}"),
            proof_logprobs(server, vllm_server, server.runtime.engine.base_name),
            strict=True,
        )
    )
    assert moved > 10 * server.runtime.settings.vllm_proof_max_diff
    # the next version goes live; v1, used by nobody, leaves vLLM too
    assert admin(server, "pin", version=v2).status_code == 200
    answer = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "thumbtune", **body}, timeout=60)
    assert answer.json()["adapter_version"] == v2
    wait_for(lambda: f"{VERSION_PREFIX}{v1}" not in served_models(vllm_server), timeout=30)
    assert f"{VERSION_PREFIX}{v2}" in served_models(vllm_server)


def test_a_version_vllm_serves_with_other_weights_is_refused(
    server: LiveServer, vllm_server: str, store: LocalAdapterStore, writer: VersionWriter
) -> None:
    stale = writer.write(store, 0.05, seed=7)  # its files stand in for other weights under v-next's name
    version = f"v{int(stale[1:]) + 1}"
    name = f"{VERSION_PREFIX}{version}"
    loaded = httpx.post(
        f"{vllm_server}/v1/load_lora_adapter",
        json={"lora_name": name, "lora_path": str(store.directory(stale))},
    )
    assert loaded.status_code == 200, loaded.text  # vLLM now holds other weights under the new name
    assert writer.write(store, 0.05, seed=8) == version
    live = server.runtime.adapters.live
    refused = admin(server, "pin", version=version)
    assert refused.status_code == 409, refused.text
    assert "proof" in refused.text
    status = httpx.get(f"{server.url}/admin/adapters", headers=ADMIN).json()
    assert status["refused"][version]["reason"] == "proof"
    assert server.runtime.adapters.live == live
    missing = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={
            "model": f"thumbtune@{version}",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
        },
    )
    assert missing.status_code == 404
    wait_for(lambda: name not in served_models(vllm_server), timeout=30)  # not left behind in vLLM
