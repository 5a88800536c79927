"""The official openai client works unchanged against a real server, streaming and not."""

from __future__ import annotations

import openai
import pytest

from tests.support.kafka import feedback_events


def test_openai_client_non_streaming_and_rating(live_server_factory) -> None:  # noqa: ANN001
    server = live_server_factory()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    raw = client.chat.completions.with_raw_response.create(
        model="thumbtune",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=0.7,
        seed=3,
    )
    completion = raw.parse()
    assert raw.headers["x-thumbtune-adapter-version"] == "v0"
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage.completion_tokens <= 8
    assert [m.id for m in client.models.list()] == ["thumbtune", "thumbtune@v0", "base"]
    # The id the client got is the one users rate.
    import httpx

    resp = httpx.post(f"{server.url}/v1/feedback", json={"response_id": completion.id, "thumb": "up"})
    assert resp.status_code == 202


def test_openai_client_streaming_with_usage(live_server_factory) -> None:  # noqa: ANN001
    server = live_server_factory()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="thumbtune",
        messages=[{"role": "user", "content": "Count to three."}],
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert isinstance(text, str)


def test_openai_client_errors_surface_as_openai_exceptions(live_server_factory) -> None:  # noqa: ANN001
    server = live_server_factory(api_keys="k1")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="thumbtune", messages=[{"role": "user", "content": "hi"}])
    good = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k1", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        good.chat.completions.create(
            model="thumbtune", messages=[{"role": "user", "content": "hi"}], max_tokens=99999
        )
    assert "max_tokens" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        good.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.slow
@pytest.mark.broker
def test_real_model_chats_and_its_rating_lands_on_the_broker(live_server_factory, broker) -> None:  # noqa: ANN001
    """The embedded SmolLM2 answers sensibly and a thumb arrives on Kafka with aligned tokens."""
    from tests.support import USER_CACHE

    server = live_server_factory(model="embedded", cache_dir=USER_CACHE, max_context=2048)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    completion = client.chat.completions.create(
        model="thumbtune",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    assert "Paris" in completion.choices[0].message.content
    import httpx

    assert (
        httpx.post(
            f"{server.url}/v1/feedback", json={"response_id": completion.id, "thumb": "up"}
        ).status_code
        == 202
    )
    # the 202 comes before the producer has sent it: flush the server's publisher, then read the topic
    event = feedback_events(server.runtime.publisher, broker.bootstrap, {completion.id}, 1)[completion.id]
    assert event.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert len(event.response_token_ids) == completion.usage.completion_tokens
    assert event.response_token_ids[-1] == 2  # <|im_end|>: stopping is part of what the learner sees
