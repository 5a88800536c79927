"""Learner test helpers: the tiny base, and feedback events sampled from a policy the way the server does."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from learner.config import LearnerSettings
from learner.policy import Policy
from learner.trainer import Learner
from thumbtune.core.base_model import LoadedBase, load_base
from thumbtune.core.contract import FeedbackEvent, FeedbackKind, Message, SamplingParams
from thumbtune.core.settings import Settings
from thumbtune.core.store import LocalAdapterStore

SMALL_BATCHES = {"batch_size": 16, "min_batch": 4, "epochs": 1, "minibatch_size": 8, "max_staleness": 1000}
"""Learner settings for the tiny model's unit tests: batches of 16, one epoch of two minibatches."""


def tiny_base(model_dir: Path, cache_dir: Path, sharpen: float = 1.0) -> LoadedBase:
    """The tiny random Llama. ``sharpen`` scales its final norm: a random model's next-token distribution
    is nearly uniform over ~50k tokens, too flat for any one token to show up in a short sample; x30
    concentrates it on a context-dependent handful, like a trained model's."""
    base = load_base(Settings(model=str(model_dir), cache_dir=cache_dir))
    if sharpen != 1.0:
        from thumbtune.core.base_model import fingerprint

        with torch.no_grad():
            base.model.model.norm.weight.mul_(sharpen)
        base.fingerprint = fingerprint(base.model)
    return base


def make_prompts(n: int, length: int, seed: int, vocab: int = 2000) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (length,), generator=g).tolist() for _ in range(n)]


@torch.no_grad()
def sample_responses(
    policy: Policy, prompt: list[int], n: int, max_tokens: int, temperature: float, generator: torch.Generator
) -> tuple[list[list[int]], list[list[float]]]:
    """``n`` answers to ``prompt`` sampled from the policy (adapter on), with log_softmax(z / T)[token] per
    token: exactly what the server records (full forward, no cache, LM head over every position)."""
    ids = torch.tensor([prompt] * n)
    logprobs = []
    for _ in range(max_tokens):
        logits = policy.model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
        logp = torch.log_softmax(logits / temperature, dim=-1)
        token = torch.multinomial(logp.exp(), 1, generator=generator)
        logprobs.append(logp.gather(1, token))
        ids = torch.cat([ids, token], dim=1)
    return ids[:, len(prompt) :].tolist(), torch.cat(logprobs, dim=1).tolist()


def make_event(
    base: LoadedBase,
    prompt: list[int],
    response: list[int],
    logprobs: list[float],
    reward: float,
    adapter_version: str = "v0",
    temperature: float = 1.0,
    **overrides: object,
) -> FeedbackEvent:
    rid = uuid.uuid4().hex
    fields: dict = {
        "event_id": uuid.uuid4().hex,
        "response_id": rid,
        "completion_id": "chatcmpl-" + rid,
        "api_key_id": None,
        "answered_at": 1.0,
        "rated_at": 2.0,
        "base_model": base.model_id,
        "base_fingerprint": base.fingerprint,
        "adapter_version": adapter_version,
        "messages": [Message(role="user", content="hi")],
        "prompt_token_ids": prompt,
        "response_token_ids": response,
        "behaviour_logprobs": logprobs,
        "sampling": SamplingParams(temperature=temperature, top_p=1.0, max_tokens=len(response)),
        "finish_reason": "length",
        "kind": FeedbackKind.thumb,
        "value": "up" if reward > 0 else "down",
        "reward": reward,
    }
    fields.update(overrides)
    return FeedbackEvent(**fields)


def sample_events(
    policy: Policy,
    base: LoadedBase,
    prompts: list[list[int]],
    per_prompt: int,
    max_tokens: int,
    reward_fn: Callable[[list[int]], float],
    generator: torch.Generator,
    temperature: float = 1.0,
) -> list[FeedbackEvent]:
    """Events for answers sampled from ``policy`` now (on-policy for its current version)."""
    events = []
    for prompt in prompts:
        responses, logprobs = sample_responses(policy, prompt, per_prompt, max_tokens, temperature, generator)
        for response, lps in zip(responses, logprobs, strict=True):
            reward = reward_fn(response)
            events.append(make_event(base, prompt, response, lps, reward, policy.version, temperature))
    return events


def make_events(model_dir: Path, cache_dir: Path, n: int, seed: int) -> list[FeedbackEvent]:
    """``n`` (a multiple of 4) rated answers the tiny model's v0 gave, valid for its fingerprint."""
    base = tiny_base(model_dir, cache_dir)
    policy = Policy.fresh(
        base.model, Settings(model=str(model_dir), cache_dir=cache_dir), torch.device("cpu")
    )
    return sample_events(
        policy,
        base,
        make_prompts(n // 4, 4, seed=seed),
        4,
        5,
        lambda r: 1.0 if r[0] % 2 else -1.0,
        torch.Generator().manual_seed(seed),
    )


def records_of(events: list[FeedbackEvent]) -> list[tuple[bytes, bytes]]:
    """The (key, value) records the server would publish for these events."""
    return [(e.key(), e.to_bytes()) for e in events]


def tiny_learner(model_dir: Path, cache_dir: Path, **overrides: object) -> Learner:
    """A `Learner` on the tiny base with `SMALL_BATCHES` (``overrides`` win), a store in ``cache_dir``."""
    return Learner(
        Settings(model=str(model_dir)),
        LearnerSettings(**(SMALL_BATCHES | overrides)),
        base=tiny_base(model_dir, cache_dir),
        store=LocalAdapterStore(cache_dir / "adapters"),
    )
