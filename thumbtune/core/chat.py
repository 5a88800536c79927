"""Conversations as token ids, and the tokens that end an answer. One encoding for everything that serves,
trains on, probes or samples the model, so the learner sees exactly the ids the server prefilled."""

from __future__ import annotations

from collections.abc import Sequence

from thumbtune.core.contract import Message


def encode_chat(tokenizer, messages: Sequence[Message | dict[str, str]]) -> list[int]:  # noqa: ANN001 - any HF tokenizer
    """The prompt token ids of a conversation: the model's chat template with the assistant turn opened."""
    turns = [m.model_dump() if isinstance(m, Message) else dict(m) for m in messages]
    ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def user_turn(text: str) -> list[dict[str, str]]:
    """A one-message conversation: what simulated users and the benchmarks send."""
    return [{"role": "user", "content": text}]


def end_token_ids(model, tokenizer) -> list[int]:  # noqa: ANN001 - any HF causal LM and its tokenizer
    """Token ids that end an answer, sorted: the generation config's end-of-turn ids, the tokenizer's EOS."""
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    configured = ids if isinstance(ids, list) else [ids] if ids is not None else []
    return sorted({*configured, tokenizer.eos_token_id})
