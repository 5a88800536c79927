"""Behaviour of the completion stores: the in-process one and Redis (shared by replicas).

Redis tests need a server at THUMBTUNE_TEST_REDIS_URL (default redis://127.0.0.1:6379/0);
without one they skip, saying so. Each test uses its own key prefix and deletes its keys.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from service.store import (
    CompletionStore,
    MemoryCompletionStore,
    RedisCompletionStore,
    StoredCompletion,
    StoreUnavailable,
    make_store,
)
from thumbtune.core.contract import FeedbackKind, Message, SamplingParams
from thumbtune.core.settings import Settings

StoreFactory = Callable[..., CompletionStore]


def completion(response_id: str = "resp-1", **overrides: object) -> StoredCompletion:
    """A record whose floats are chosen to break any lossy encoding."""
    fields: dict[str, object] = {
        "response_id": response_id,
        "completion_id": "chatcmpl-abc",
        "api_key_id": "3f2a9c",
        "answered_at": 1_732_000_000.123456,
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "base_fingerprint": "sha256:deadbeef",
        "adapter_version": "v7",
        "messages": [
            Message(role="system", content="Be brief."),
            Message(role="user", content='héllo ✓\n"q"'),
        ],
        "prompt_token_ids": [1, 9690, 198, 0, 151_642],
        "response_token_ids": [13, 42, 2, 7, 99, 5],
        "behaviour_logprobs": [-0.1, -1e-300, -5e-324, -2.3025850929940455, -0.0, float("-inf")],
        "sampling": SamplingParams(
            temperature=0.7, top_p=0.95, max_tokens=64, seed=None, stop=["</s>", "\n\n"]
        ),
        "finish_reason": "length",
        "text": "Hi — there.",
    }
    fields.update(overrides)
    return StoredCompletion(**fields)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make_redis(redis_url: str, redis_prefix: str) -> Iterator[StoreFactory]:
    made: list[RedisCompletionStore] = []

    def factory(ttl_s: int = 60) -> RedisCompletionStore:
        store = RedisCompletionStore(redis_url, ttl_s, prefix=redis_prefix)
        made.append(store)
        return store

    yield factory
    for store in made:
        store.close()


@pytest.fixture(params=["memory", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make(kind: str, clock: FakeClock, request: pytest.FixtureRequest) -> StoreFactory:
    """A store factory of the parametrized kind; ``ttl_s`` is the only knob the tests turn."""
    if kind == "memory":
        return lambda ttl_s=60: MemoryCompletionStore(ttl_s, max_items=1000, clock=clock)
    return request.getfixturevalue("make_redis")


@pytest.fixture
def wait(kind: str, clock: FakeClock) -> Callable[[float], None]:
    """Let time pass: the memory store's clock jumps, Redis really waits."""

    def advance(seconds: float) -> None:
        if kind == "memory":
            clock.now += seconds
        else:
            time.sleep(seconds)

    return advance


# --- both stores ----------------------------------------------------------------------------


def test_put_then_get_preserves_every_field_exactly(make: StoreFactory) -> None:
    store = make()
    rec = completion()
    store.put(rec)
    got = store.get(rec.response_id)
    assert got == rec
    assert [x.hex() for x in got.behaviour_logprobs] == [x.hex() for x in rec.behaviour_logprobs]
    assert got.answered_at.hex() == rec.answered_at.hex()
    assert got.sampling.seed is None and got.api_key_id == "3f2a9c"


def test_get_of_unknown_response_id_is_none(make: StoreFactory) -> None:
    assert make().get("never-stored") is None


def test_put_many_stores_every_choice(make: StoreFactory) -> None:
    store = make()
    recs = [completion(f"resp-{i}", text=f"choice {i}") for i in range(5)]
    store.put_many(recs)
    assert [store.get(r.response_id) for r in recs] == recs
    store.put_many([])  # nothing to store is not an error


def test_put_again_overwrites(make: StoreFactory) -> None:
    store = make()
    store.put(completion(text="first"))
    store.put(completion(text="second"))
    assert store.get("resp-1").text == "second"


def test_answer_expires_after_ttl(make: StoreFactory, wait: Callable[[float], None]) -> None:
    store = make(ttl_s=1)
    store.put(completion())
    assert store.get("resp-1") is not None
    wait(1.5)
    assert store.get("resp-1") is None


def test_claim_once_then_repeat_returns_first_payload(make: StoreFactory) -> None:
    store = make()
    assert store.claim_rating("resp-1:key-a", '{"event_id":"e1","value":"up"}') is None
    assert (
        store.claim_rating("resp-1:key-a", '{"event_id":"e2","value":"down"}')
        == '{"event_id":"e1","value":"up"}'
    )
    assert store.claim_rating("resp-1:key-b", "other key") is None


def test_released_claim_can_be_claimed_again(make: StoreFactory) -> None:
    store = make()
    assert store.claim_rating("k", "first") is None
    store.release_rating("k")
    assert store.claim_rating("k", "second") is None
    assert store.claim_rating("k", "third") == "second"
    store.release_rating("never-claimed")  # releasing nothing is harmless


def test_claim_expires_after_ttl(make: StoreFactory, wait: Callable[[float], None]) -> None:
    store = make(ttl_s=1)
    assert store.claim_rating("k", "first") is None
    wait(1.5)
    assert store.claim_rating("k", "second") is None


def test_concurrent_claims_on_one_key_have_exactly_one_winner(make: StoreFactory) -> None:
    store = make()
    start = threading.Barrier(8)
    results: dict[int, str | None] = {}

    def claim(i: int) -> None:
        start.wait()
        results[i] = store.claim_rating("contended", f"payload-{i}")

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    winners = [i for i, r in results.items() if r is None]
    assert len(results) == 8 and len(winners) == 1
    assert all(r == f"payload-{winners[0]}" for i, r in results.items() if i != winners[0])


def test_ping_answers(make: StoreFactory) -> None:
    assert make().ping() is True


# --- memory store ---------------------------------------------------------------------------


def test_memory_store_evicts_oldest_when_full(clock: FakeClock) -> None:
    store = MemoryCompletionStore(ttl_s=60, max_items=3, clock=clock)
    for i in range(5):
        store.put(completion(f"resp-{i}"))
    assert len(store) == 3
    assert store.get("resp-0") is None and store.get("resp-1") is None
    assert all(store.get(f"resp-{i}") is not None for i in (2, 3, 4))


def test_memory_store_sweeps_expired_answers_on_write(clock: FakeClock) -> None:
    store = MemoryCompletionStore(ttl_s=10, max_items=100, clock=clock)
    store.put_many([completion(f"old-{i}") for i in range(50)])
    clock.now += 11
    store.put(completion("new"))
    assert len(store) == 1


def test_memory_store_get_returns_a_copy(clock: FakeClock) -> None:
    store = MemoryCompletionStore(ttl_s=60, max_items=10, clock=clock)
    store.put(completion())
    store.get("resp-1").response_token_ids.append(12345)
    assert store.get("resp-1") == completion()


# --- Redis: replicas, expiry in Redis, failure ----------------------------------------------


def test_two_redis_replicas_share_completions_and_claims(make_redis: StoreFactory) -> None:
    a, b = make_redis(), make_redis()
    a.put(completion("from-a"))
    b.put_many([completion("from-b")])
    assert b.get("from-a") == completion("from-a")
    assert a.get("from-b") == completion("from-b")
    assert a.claim_rating("from-a:key", "claimed by a") is None
    assert b.claim_rating("from-a:key", "claimed by b") == "claimed by a"
    a.release_rating("from-a:key")
    assert b.claim_rating("from-a:key", "claimed by b") is None


def test_redis_keys_carry_the_ttl(make_redis: StoreFactory, redis_url: str, redis_prefix: str) -> None:
    store = make_redis(ttl_s=120)
    store.put(completion())
    store.claim_rating("k", "p")
    client = redis.Redis.from_url(redis_url)
    try:
        for key in (f"{redis_prefix}completion:resp-1", f"{redis_prefix}rating:k"):
            assert 0 < client.ttl(key) <= 120
    finally:
        client.close()


def test_unreachable_redis_fails_at_construction_with_advice() -> None:
    with pytest.raises(StoreUnavailable, match="THUMBTUNE_REDIS_URL") as info:
        RedisCompletionStore("redis://:hunter2@127.0.0.1:1/0", ttl_s=60, socket_timeout_s=0.5)
    assert "hunter2" not in str(info.value)
    assert "127.0.0.1:1" in str(info.value)


# --- the record and the factory -------------------------------------------------------------


def test_record_rejects_logprobs_misaligned_with_tokens() -> None:
    with pytest.raises(ValueError, match="6 response tokens but 2 log-probs"):
        completion(behaviour_logprobs=[-0.1, -0.2])


def test_record_becomes_a_feedback_event_once_rated() -> None:
    rec = completion()
    event = rec.to_event(event_id="ev-1", rated_at=1_732_000_100.0, kind=FeedbackKind.rating, value=5)
    assert event.reward == 1.0 and event.response_id == rec.response_id
    assert event.behaviour_logprobs == rec.behaviour_logprobs and event.sampling == rec.sampling


def test_make_store_is_memory_without_redis_url() -> None:
    store = make_store(Settings(redis_url=None, completion_ttl_s=5, completion_store_max=7))
    assert isinstance(store, MemoryCompletionStore)


def test_make_store_is_redis_with_redis_url(redis_url: str) -> None:
    store = make_store(Settings(redis_url=redis_url))
    try:
        assert isinstance(store, RedisCompletionStore) and store.ping()
    finally:
        store.close()
