"""The chat API as the tests call it: a one-message conversation, a chat request, OpenAI's error shape."""

from __future__ import annotations

USER = [{"role": "user", "content": "Say something."}]


def chat(client, **body):  # noqa: ANN001, ANN201 - a TestClient, its response
    return client.post("/v1/chat/completions", json={"model": "thumbtune", "messages": USER, **body})


def assert_openai_error(resp, status: int, param: str | None = None) -> dict:  # noqa: ANN001
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    return err
