"""Ratings become events on a real broker, with everything the learner needs; auth and idempotency."""

from __future__ import annotations

import pytest

from tests.support.api import USER, assert_openai_error, chat
from tests.support.kafka import feedback_events
from thumbtune.core.chat import encode_chat

pytestmark = pytest.mark.broker


def answer(client, **body) -> dict:  # noqa: ANN001
    resp = chat(client, max_tokens=12, temperature=1.0, logprobs=True, **body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def events_of(client, broker, response_ids: set[str], expected: int) -> dict:  # noqa: ANN001
    """This client's feedback events on the session broker, by response id (the topic is shared)."""
    return feedback_events(client.app.state.runtime.publisher, broker.bootstrap, response_ids, expected)


def test_thumb_event_carries_tokens_logprobs_and_version(client, broker) -> None:  # noqa: ANN001
    body = answer(client)
    choice = body["choices"][0]
    resp = client.post("/v1/feedback", json={"response_id": choice["response_id"], "thumb": "up"})
    assert resp.status_code == 202 and resp.json()["status"] == "accepted"
    (ev,) = events_of(client, broker, {choice["response_id"]}, 1).values()
    rt = client.app.state.runtime
    assert ev.reward == 1.0 and ev.kind.value == "thumb" and ev.value == "up"
    assert ev.event_id == resp.json()["event_ids"][0]
    assert ev.adapter_version == "v0" and ev.base_fingerprint == rt.fingerprint
    assert ev.messages[0].content == USER[0]["content"]
    assert ev.prompt_token_ids == encode_chat(rt.tokenizer, ev.messages)
    # Token ids and log-probs line up with the answer the user saw.
    assert len(ev.response_token_ids) == body["usage"]["completion_tokens"] == len(ev.behaviour_logprobs)
    assert ev.behaviour_logprobs == [t["logprob"] for t in choice["logprobs"]["content"]]
    assert (
        rt.tokenizer.decode(ev.response_token_ids, skip_special_tokens=True) == choice["message"]["content"]
    )
    assert ev.sampling.temperature == 1.0 and ev.sampling.max_tokens == 12
    assert ev.finish_reason == choice["finish_reason"]


def test_the_requests_user_field_travels_with_its_ratings(client, broker) -> None:  # noqa: ANN001
    alice = answer(client, user="alice")["id"]
    anonymous = answer(client)["id"]
    for rid in (alice, anonymous):
        assert client.post("/v1/feedback", json={"response_id": rid, "thumb": "up"}).status_code == 202
    events = events_of(client, broker, {alice, anonymous}, 2)
    assert events[alice].user == "alice" and events[anonymous].user is None  # for the learner's rater caps


@pytest.mark.parametrize(("rating", "reward"), [(1, -1.0), (2, -0.5), (3, 0.0), (4, 0.5), (5, 1.0)])
def test_rating_maps_to_reward(client, broker, rating: int, reward: float) -> None:  # noqa: ANN001
    rid = answer(client)["id"]
    resp = client.post("/v1/feedback", json={"response_id": rid, "rating": rating, "comment": "ok"})
    assert resp.status_code == 202
    (ev,) = events_of(client, broker, {rid}, 1).values()
    assert ev.reward == reward and ev.value == rating and ev.comment == "ok"


def test_choice_between_two_answers_gives_plus_and_minus_one(client, broker) -> None:  # noqa: ANN001
    body = answer(client, n=2)
    a, b = (c["response_id"] for c in body["choices"])
    resp = client.post("/v1/feedback", json={"chosen": b, "rejected": a})
    assert resp.status_code == 202 and len(resp.json()["event_ids"]) == 2
    events = events_of(client, broker, {a, b}, 2)
    assert events[b].reward == 1.0 and events[b].value == "chosen" and events[b].paired_response_id == a
    assert events[a].reward == -1.0 and events[a].value == "rejected" and events[a].paired_response_id == b


def test_choice_needs_two_answers_to_the_same_prompt(shared_client) -> None:  # noqa: ANN001
    client = shared_client  # refused ratings claim nothing: the module's server will do
    a = answer(client)["id"]
    b = answer(client, messages=[{"role": "user", "content": "Something else."}])["id"]
    assert_openai_error(client.post("/v1/feedback", json={"chosen": a, "rejected": b}), 400)
    assert_openai_error(client.post("/v1/feedback", json={"chosen": a, "rejected": a}), 400)


def test_repeat_rating_is_idempotent_and_published_once(client, broker) -> None:  # noqa: ANN001
    rid = answer(client)["id"]
    first = client.post("/v1/feedback", json={"response_id": rid, "thumb": "down"})
    again = client.post("/v1/feedback", json={"response_id": rid, "thumb": "down"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.json() == {"status": "duplicate", "event_ids": first.json()["event_ids"]}
    conflicting = client.post("/v1/feedback", json={"response_id": rid, "thumb": "up"})
    assert_openai_error(conflicting, 409)
    events_of(client, broker, {rid}, 1)


def test_unknown_response_is_404(shared_client) -> None:  # noqa: ANN001
    err = assert_openai_error(
        shared_client.post("/v1/feedback", json={"response_id": "chatcmpl-nope", "thumb": "up"}), 404
    )
    assert "chatcmpl-nope" in err["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"response_id": "x"},
        {"response_id": "x", "thumb": "sideways"},
        {"response_id": "x", "rating": 6},
        {"response_id": "x", "thumb": "up", "rating": 5},
        {"chosen": "x"},
        {"thumb": "up"},
        {"response_id": "x", "thumb": "up", "extra": 1},
    ],
)
def test_malformed_feedback_is_400(shared_client, body: dict) -> None:  # noqa: ANN001
    assert_openai_error(shared_client.post("/v1/feedback", json=body), 400)


def test_api_keys_guard_chat_and_feedback_and_keys_rate_only_their_answers(client_factory) -> None:  # noqa: ANN001
    client = client_factory(api_keys="alice-key,bob-key")
    assert_openai_error(chat(client), 401)
    wrong = client.post(
        "/v1/chat/completions",
        json={"model": "thumbtune", "messages": USER},
        headers={"Authorization": "Bearer wrong"},
    )
    assert_openai_error(wrong, 401)
    alice = {"Authorization": "Bearer alice-key"}
    bob = {"Authorization": "Bearer bob-key"}
    rid = client.post(
        "/v1/chat/completions", json={"model": "thumbtune", "messages": USER, "max_tokens": 4}, headers=alice
    ).json()["id"]
    assert_openai_error(client.post("/v1/feedback", json={"response_id": rid, "thumb": "up"}), 401)
    assert_openai_error(
        client.post("/v1/feedback", json={"response_id": rid, "thumb": "up"}, headers=bob), 404
    )
    assert (
        client.post("/v1/feedback", json={"response_id": rid, "thumb": "up"}, headers=alice).status_code
        == 202
    )


def test_admin_routes_refused_without_token_configured_and_need_it_when_set(client_factory) -> None:  # noqa: ANN001
    assert_openai_error(client_factory().get("/admin/adapters"), 403)
    client = client_factory(admin_token="s3cret")
    assert_openai_error(client.get("/admin/adapters"), 401)
    assert_openai_error(client.get("/admin/adapters", headers={"Authorization": "Bearer nope"}), 401)
    ok = client.get("/admin/adapters", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["live"] == "v0"


def test_feedback_metrics_count_by_kind_value_and_version(client) -> None:  # noqa: ANN001
    rid = answer(client)["id"]
    client.post("/v1/feedback", json={"response_id": rid, "thumb": "up"})
    text = client.get("/metrics").text
    assert 'thumbtune_feedback_total{adapter_version="v0",kind="thumb",value="up"}' in text


def test_a_ranking_of_all_answers_rewards_them_linearly_and_keeps_every_pair(client, broker) -> None:  # noqa: ANN001
    a, b, c = (ch["response_id"] for ch in answer(client, n=3)["choices"])
    resp = client.post("/v1/feedback", json={"ranking": [b, c, a], "comment": "b is best"})
    assert resp.status_code == 202 and len(resp.json()["event_ids"]) == 3
    events = events_of(client, broker, {a, b, c}, 3)
    assert {rid: (e.value, e.reward) for rid, e in events.items()} == {b: (1, 1.0), c: (2, 0.0), a: (3, -1.0)}
    assert {e.kind.value for e in events.values()} == {"ranking"} and {
        e.ranking_size for e in events.values()
    } == {3}
    (ranking_id,) = {e.ranking_id for e in events.values()}
    assert ranking_id and all(e.comment == "b is best" for e in events.values())
    pairs = {
        (x.response_id, y.response_id) for x in events.values() for y in events.values() if x.value < y.value
    }
    assert pairs == {(b, c), (b, a), (c, a)}  # every pair of the ranking, preferred first

    again = client.post("/v1/feedback", json={"ranking": [b, c, a], "comment": "b is best"})
    assert again.status_code == 200 and again.json() == {
        "status": "duplicate",
        "event_ids": resp.json()["event_ids"],
    }
    assert_openai_error(client.post("/v1/feedback", json={"ranking": [a, b, c]}), 409)
    events_of(client, broker, {a, b, c}, 3)  # nothing published twice


def test_rankings_that_are_not_one_whole_request_are_refused(client) -> None:  # noqa: ANN001
    x, y, z = (ch["response_id"] for ch in answer(client, n=3)["choices"])
    other = answer(client, n=2)["choices"][0]["response_id"]
    err = assert_openai_error(client.post("/v1/feedback", json={"ranking": [x, y]}), 400, "ranking")
    assert err["code"] == "incomplete_ranking" and "all 3 answers" in err["message"]
    err = assert_openai_error(client.post("/v1/feedback", json={"ranking": [x, y, other]}), 400, "ranking")
    assert err["code"] == "not_one_request"
    err = assert_openai_error(client.post("/v1/feedback", json={"ranking": [x, y, "chatcmpl-nope"]}), 404)
    assert err["param"] == "ranking" and "chatcmpl-nope" in err["message"]
    for bad in ([x], [x, x, y], [x, y, z, x, y], "x"):
        assert_openai_error(client.post("/v1/feedback", json={"ranking": bad}), 400)
    assert_openai_error(client.post("/v1/feedback", json={"ranking": [x, y, z], "thumb": "up"}), 400)
    assert client.post("/v1/feedback", json={"ranking": [z, y, x]}).status_code == 202  # nothing was claimed


def test_the_best_of_several_answers_is_one_choice_over_each_of_the_others(client, broker) -> None:  # noqa: ANN001
    a, b, c = (ch["response_id"] for ch in answer(client, n=3)["choices"])
    resp = client.post("/v1/feedback", json={"chosen": b, "rejected": [a, c]})
    assert resp.status_code == 202 and len(resp.json()["event_ids"]) == 3
    events = events_of(client, broker, {a, b, c}, 3)
    assert {rid: (e.value, e.reward, e.paired_response_id) for rid, e in events.items()} == {
        b: ("chosen", 1.0, None),
        a: ("rejected", -1.0, b),
        c: ("rejected", -1.0, b),
    }
    again = client.post("/v1/feedback", json={"chosen": b, "rejected": [a, c]})
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    assert_openai_error(client.post("/v1/feedback", json={"chosen": a, "rejected": [b, c]}), 409)
    other = answer(client, messages=[{"role": "user", "content": "Something else."}])["id"]
    x, y = (ch["response_id"] for ch in answer(client, n=2)["choices"])
    err = assert_openai_error(client.post("/v1/feedback", json={"chosen": x, "rejected": [y, other]}), 400)
    assert err["code"] == "not_a_pair"
    for bad in ([x, y], [], [y, y], [y, "1", "2", "3"]):
        assert_openai_error(client.post("/v1/feedback", json={"chosen": x, "rejected": bad}), 400)
