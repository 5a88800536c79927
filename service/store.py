"""The completion store: answers kept until the user rates them or they expire.

Users rate an answer minutes after they got it, possibly through another replica, so the
server keeps everything a ``FeedbackEvent`` needs except the rating itself. The store also
records which ratings were already given (``claim_rating``), which is what makes a repeated
rating idempotent and never double-counted, across replicas when the store is Redis.

Two implementations behind one protocol: ``MemoryCompletionStore`` for a single process and
``RedisCompletionStore`` for replicas sharing one Redis. ``make_store`` picks from settings.
The API is synchronous on purpose: FastAPI runs it in its threadpool.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import redis
from pydantic import BaseModel, ConfigDict, Field, model_validator

from thumbtune.core.contract import (
    Engine,
    FeedbackEvent,
    FeedbackKind,
    Message,
    SamplingParams,
    check_aligned,
    reward_for,
)
from thumbtune.core.settings import Settings


class StoredCompletion(BaseModel):
    """One answer as served: a ``FeedbackEvent`` minus the rating.

    Non-finite log-probs serialize as JSON ``-Infinity``/``NaN`` constants rather than
    ``null``, so every float survives the round trip through the store exactly.
    """

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    response_id: str
    completion_id: str
    api_key_id: str | None
    user: str | None = Field(default=None, description="The request's ``user`` field (None: not sent).")
    answered_at: float
    base_model: str
    base_fingerprint: str
    adapter_version: str
    messages: list[Message]
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    behaviour_logprobs: list[float]
    sampling: SamplingParams
    finish_reason: Literal["stop", "length"]
    text: str
    n: int | None = Field(
        default=None, description="How many answers the request asked for (None: stored before it was kept)."
    )
    engine: Engine | None = Field(
        default=None, description="What generated it (None: stored before it was kept)."
    )

    @model_validator(mode="after")
    def _aligned(self) -> StoredCompletion:
        check_aligned(self.response_token_ids, self.behaviour_logprobs)  # now, not when the rating comes
        return self

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, data: str | bytes) -> StoredCompletion:
        return cls.model_validate_json(data)

    def to_event(
        self,
        *,
        event_id: str,
        rated_at: float,
        kind: FeedbackKind,
        value: str | int,
        comment: str | None = None,
        paired_response_id: str | None = None,
        ranking_id: str | None = None,
        ranking_size: int | None = None,
    ) -> FeedbackEvent:
        """The feedback event for this answer once rated; the reward follows ``reward_for``."""
        fields = self.model_dump(exclude={"text", "n"})
        return FeedbackEvent(
            **fields,
            event_id=event_id,
            rated_at=rated_at,
            kind=kind,
            value=value,
            reward=reward_for(kind, value, ranking_size),
            comment=comment,
            paired_response_id=paired_response_id,
            ranking_id=ranking_id,
            ranking_size=ranking_size,
        )


@runtime_checkable
class CompletionStore(Protocol):
    """Where answers wait for their rating. Every method is blocking and thread-safe."""

    def put(self, rec: StoredCompletion) -> None:
        """Keep ``rec`` ratable for the store's TTL (overwrites a record with the same id)."""

    def put_many(self, recs: Iterable[StoredCompletion]) -> None:
        """``put`` for every record; the choices of one request arrive together."""

    def get(self, response_id: str) -> StoredCompletion | None:
        """The stored answer, or None when unknown or expired."""

    def claim_rating(self, rating_key: str, payload: str) -> str | None:
        """Atomically claim ``rating_key``: None if this call claimed it, else the earlier payload."""

    def release_rating(self, rating_key: str) -> None:
        """Undo a claim, so a rating whose publishing failed can be retried."""

    def ping(self) -> bool:
        """Whether the store answers (readiness probe)."""

    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""


class _ExpiringDict:
    """An insertion-ordered dict whose entries all live ``ttl_s``, capped at ``max_items``.

    All entries share one TTL and a re-set moves the key to the end, so insertion order is
    expiry order: sweeping pops expired entries off the front only, each entry at most once
    (amortised O(1) per write, never a scan). Not thread-safe; the owner holds a lock.
    """

    def __init__(self, ttl_s: float, max_items: int, clock: Callable[[], float]) -> None:
        self._ttl_s = ttl_s
        self._max_items = max_items
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> str | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires_at, value = item
        if expires_at <= self._clock():
            del self._items[key]
            return None
        return value

    def set(self, key: str, value: str) -> None:
        now = self._clock()
        self._sweep(now)
        self._items[key] = (now + self._ttl_s, value)
        self._items.move_to_end(key)
        while len(self._items) > self._max_items:
            self._items.popitem(last=False)

    def pop(self, key: str) -> None:
        self._items.pop(key, None)

    def _sweep(self, now: float) -> None:
        while self._items:
            expires_at, _ = next(iter(self._items.values()))
            if expires_at > now:
                return
            self._items.popitem(last=False)


class MemoryCompletionStore:
    """The in-process store: one replica only, contents lost on restart.

    Records are kept as their JSON, like in Redis: a compact string costs far less memory
    than a model holding thousands of Python ints and floats, and ``get`` hands out a fresh
    copy a caller cannot mutate into the store. When full the oldest answer is evicted
    (it would be the first to expire anyway); claims have the same cap and TTL.
    """

    def __init__(self, ttl_s: float, max_items: int, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s <= 0 or max_items < 1:
            raise ValueError(f"need ttl_s > 0 and max_items >= 1, got ttl_s={ttl_s}, max_items={max_items}")
        self._lock = threading.Lock()
        self._completions = _ExpiringDict(ttl_s, max_items, clock)
        self._claims = _ExpiringDict(ttl_s, max_items, clock)

    def __len__(self) -> int:
        """Completions held now, expired ones not yet swept included."""
        with self._lock:
            return len(self._completions)

    def put(self, rec: StoredCompletion) -> None:
        self.put_many([rec])

    def put_many(self, recs: Iterable[StoredCompletion]) -> None:
        encoded = [(rec.response_id, rec.to_json()) for rec in recs]  # serialize outside the lock
        with self._lock:
            for response_id, data in encoded:
                self._completions.set(response_id, data)

    def get(self, response_id: str) -> StoredCompletion | None:
        with self._lock:
            data = self._completions.get(response_id)
        return None if data is None else StoredCompletion.from_json(data)

    def claim_rating(self, rating_key: str, payload: str) -> str | None:
        with self._lock:
            earlier = self._claims.get(rating_key)
            if earlier is not None:
                return earlier
            self._claims.set(rating_key, payload)
            return None

    def release_rating(self, rating_key: str) -> None:
        with self._lock:
            self._claims.pop(rating_key)

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        pass


class StoreUnavailable(RuntimeError):
    """The configured completion store cannot be reached."""


# Get the earlier claim or set ours, in one atomic step. Lua rather than SET NX GET so
# Redis older than 7.0 works too; `false` comes back to Python as None.
_CLAIM_SCRIPT = """
local earlier = redis.call('GET', KEYS[1])
if earlier then return earlier end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""


def _redact(url: str) -> str:
    """The URL without its password, fit for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


class RedisCompletionStore:
    """Completions and claims in Redis, shared by every replica that uses the same URL and prefix.

    Keys: ``<prefix>completion:<response_id>`` and ``<prefix>rating:<rating_key>``, both with
    ``EX ttl_s``, so Redis does the expiry. Short socket timeouts keep a Redis outage from
    pinning threadpool workers: a request fails in seconds instead of hanging.
    """

    def __init__(
        self, url: str, ttl_s: int, prefix: str = "thumbtune:", socket_timeout_s: float = 2.0
    ) -> None:
        if ttl_s < 1:
            raise ValueError(f"Redis expiry is in whole seconds: need ttl_s >= 1, got {ttl_s}")
        self._ttl_s = int(ttl_s)
        self._prefix = prefix
        self._url = _redact(url)
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            health_check_interval=30,
            decode_responses=True,
        )
        try:
            self._client.ping()
        except redis.RedisError as exc:
            self._client.close()
            raise StoreUnavailable(
                f"cannot reach Redis at {self._url} ({type(exc).__name__}: {exc}). Start Redis there, "
                "fix THUMBTUNE_REDIS_URL, or unset it to keep completions in process (one replica only)."
            ) from exc
        self._claim = self._client.register_script(_CLAIM_SCRIPT)

    def _completion_key(self, response_id: str) -> str:
        return f"{self._prefix}completion:{response_id}"

    def _rating_key(self, rating_key: str) -> str:
        return f"{self._prefix}rating:{rating_key}"

    def put(self, rec: StoredCompletion) -> None:
        self._client.set(self._completion_key(rec.response_id), rec.to_json(), ex=self._ttl_s)

    def put_many(self, recs: Iterable[StoredCompletion]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for rec in recs:
            pipe.set(self._completion_key(rec.response_id), rec.to_json(), ex=self._ttl_s)
        pipe.execute()

    def get(self, response_id: str) -> StoredCompletion | None:
        data = self._client.get(self._completion_key(response_id))
        return None if data is None else StoredCompletion.from_json(data)

    def claim_rating(self, rating_key: str, payload: str) -> str | None:
        earlier = self._claim(keys=[self._rating_key(rating_key)], args=[payload, self._ttl_s])
        return None if earlier is None else str(earlier)

    def release_rating(self, rating_key: str) -> None:
        self._client.delete(self._rating_key(rating_key))

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        self._client.close()


def make_store(settings: Settings) -> CompletionStore:
    """Redis when ``redis_url`` is set (replicas share answers and claims), else in process."""
    if settings.redis_url:
        return RedisCompletionStore(settings.redis_url, settings.completion_ttl_s)
    return MemoryCompletionStore(settings.completion_ttl_s, settings.completion_store_max)
