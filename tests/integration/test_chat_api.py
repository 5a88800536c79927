"""The chat API on the tiny model: OpenAI shapes, model names, streaming, and every limit."""

from __future__ import annotations

import json

import pytest

from tests.support.api import USER, assert_openai_error, chat

pytestmark = pytest.mark.broker


@pytest.fixture
def client(shared_client):  # noqa: ANN001, ANN201
    """The tests here only ask, and read their own answers: one server for the module (`shared_client`)."""
    return shared_client


def test_chat_completion_has_ratable_id_usage_and_adapter_header(client) -> None:  # noqa: ANN001
    resp = chat(client, max_tokens=8, temperature=0)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["response_id"] == body["id"]
    assert choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] <= 8
    assert (
        body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )
    assert resp.headers["x-thumbtune-adapter-version"] == "v0" == body["adapter_version"]


def test_n_choices_each_get_their_own_response_id(client) -> None:  # noqa: ANN001
    body = chat(client, n=3, max_tokens=6, temperature=1.0, seed=1).json()
    ids = [c["response_id"] for c in body["choices"]]
    assert len(set(ids)) == 3 and ids[0] == body["id"]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]


def test_seed_makes_sampling_reproducible(client) -> None:  # noqa: ANN001
    a = chat(client, max_tokens=12, temperature=1.0, seed=42).json()["choices"][0]["message"]["content"]
    b = chat(client, max_tokens=12, temperature=1.0, seed=42).json()["choices"][0]["message"]["content"]
    assert a == b


def test_empty_adapter_v0_answers_exactly_like_base(client) -> None:  # noqa: ANN001
    live = chat(client, max_tokens=12, temperature=0, logprobs=True).json()["choices"][0]
    base = client.post(
        "/v1/chat/completions",
        json={"model": "base", "messages": USER, "max_tokens": 12, "temperature": 0, "logprobs": True},
    ).json()["choices"][0]
    assert live["message"]["content"] == base["message"]["content"]
    for a, b in zip(live["logprobs"]["content"], base["logprobs"]["content"], strict=True):
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-5)


def test_streaming_sends_openai_chunks_and_done(client) -> None:  # noqa: ANN001
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "thumbtune",
            "messages": USER,
            "max_tokens": 10,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    finals = [c for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert len(finals) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 10
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    # The streamed answer is the stored one: rating it right after [DONE] works.
    rid = chunks[0]["choices"][0]["response_id"]
    assert client.app.state.runtime.store.get(rid).text == text


def test_stop_sequence_ends_the_answer_before_it(client) -> None:  # noqa: ANN001
    full = chat(client, max_tokens=30, temperature=0).json()["choices"][0]["message"]["content"]
    assert len(full) > 6
    stop = full[3:6]
    cut = chat(client, max_tokens=30, temperature=0, stop=[stop]).json()["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["message"]["content"] == full[: full.index(stop)]


def test_models_lists_live_each_loaded_version_and_base(client) -> None:  # noqa: ANN001
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["thumbtune", "thumbtune@v0", "base"]
    assert chat(client, model="thumbtune@v0", max_tokens=2).status_code == 200


def test_unknown_model_is_404_with_the_available_names(client) -> None:  # noqa: ANN001
    err = assert_openai_error(chat(client, model="gpt-9"), 404, "model")
    assert "thumbtune@v0" in err["message"]
    assert_openai_error(chat(client, model="thumbtune@v99"), 404, "model")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 10_000}, "max_tokens"),
        ({"max_completion_tokens": 10_000}, "max_completion_tokens"),
        ({"n": 5}, "n"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, None),
        ({"messages": [{"role": "user", "content": "   "}]}, None),
        ({"messages": [{"role": "user", "content": "hi"}] * 65}, "messages"),
        ({"messages": [{"role": "user", "content": "word " * 600}]}, "messages"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, None),
    ],
)
def test_bad_requests_get_openai_400s(client, body: dict, param: str | None) -> None:  # noqa: ANN001
    assert_openai_error(chat(client, **body), 400, param)


def test_context_overflow_names_the_numbers(client) -> None:  # noqa: ANN001
    err = assert_openai_error(chat(client, messages=[{"role": "user", "content": "word " * 600}]), 400)
    assert err["code"] == "context_length_exceeded" and "512" in err["message"]


def test_invalid_json_and_oversized_body(client_factory) -> None:  # noqa: ANN001
    client = client_factory(max_body_bytes=2048)
    resp = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_openai_error(resp, 400)
    big = {"model": "thumbtune", "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_openai_error(client.post("/v1/chat/completions", json=big), 413)


def test_health_readiness_and_metrics(client) -> None:  # noqa: ANN001
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model"] is True
    chat(client, max_tokens=3)
    text = client.get("/metrics").text
    for name in (
        "thumbtune_http_requests_total",
        "thumbtune_time_to_first_token_seconds",
        "thumbtune_generated_tokens_total",
        "thumbtune_batch_size",
        "thumbtune_active_adapter_info",
    ):
        assert name in text
    assert 'route="/v1/chat/completions"' in text
