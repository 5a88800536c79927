"""Chat completions: OpenAI request -> engine sequences -> response or SSE stream.

Every answer is stored (completion store) before the client sees its last byte, so a
rating can follow immediately, from any replica when the store is Redis.

A request is prepared (validated against the settings, its model resolved, its prompt encoded), then
started (its sequences submitted to the engine: a refusal is a 503 before any byte is sent), then
completed or streamed.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from service import metrics
from service.engine.engine import Sequence, TokenEvent
from service.errors import APIError, error_body
from service.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    TokenLogprob,
    Usage,
)
from service.runtime import Runtime
from service.store import StoredCompletion
from thumbtune.core.chat import encode_chat
from thumbtune.core.contract import Message, SamplingParams


@dataclass
class Running:
    """A prepared request's sequences in the engine, and the queue their tokens arrive on."""

    seqs: list[Sequence]
    queue: asyncio.Queue


@dataclass
class Prepared:
    completion_id: str
    response_ids: list[str]
    prompt_ids: list[int]
    messages: list[Message]
    params: SamplingParams
    adapters: list[str]
    """The version each answer runs on: one version, or in a mixed compare request live and the canary."""
    key_id: str | None
    model_name: str
    created: int
    user: str | None = None
    """The request's ``user`` field: the canary's subject, and the events' ``user``."""

    @property
    def adapter(self) -> str:
        """What the response names: the version, or 'v3+v4' for a mixed compare request (which answer came
        from which is not shown)."""
        return "+".join(dict.fromkeys(sorted(self.adapters)))


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


class ChatService:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    # --- request -> prompt --------------------------------------------------------------------

    def prepare(self, req: ChatCompletionRequest, key_id: str | None) -> Prepared:
        s = self.rt.settings
        if len(req.messages) > s.max_messages:
            raise APIError(
                400,
                f"too many messages: {len(req.messages)} > {s.max_messages}",
                param="messages",
                code="too_many_messages",
            )
        max_tokens = req.max_completion_tokens or req.max_tokens or s.default_max_tokens
        if max_tokens > s.max_tokens_cap:
            param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise APIError(
                400,
                f"{param} {max_tokens} exceeds this server's cap of {s.max_tokens_cap}",
                param=param,
                code="max_tokens_too_large",
            )
        adapters = self.rt.models.answers(
            req.model, req.n, subject=req.user or key_id
        )  # the canary is per user
        messages = [
            Message(role="system" if m.role == "developer" else m.role, content=m.text) for m in req.messages
        ]
        prompt_ids = encode_chat(self.rt.tokenizer, messages)
        if len(prompt_ids) + max_tokens > self.rt.max_context:
            raise APIError(
                400,
                f"this model's context window is {self.rt.max_context} tokens; the messages take "
                f"{len(prompt_ids)} and max_tokens asks for {max_tokens}: "
                "shorten the conversation or max_tokens",
                param="messages",
                code="context_length_exceeded",
            )
        completion_id = new_id()
        response_ids = [completion_id] + [new_id() for _ in range(req.n - 1)]
        params = SamplingParams(
            temperature=req.temperature, top_p=req.top_p, max_tokens=max_tokens, seed=req.seed, stop=req.stop
        )
        return Prepared(
            completion_id,
            response_ids,
            prompt_ids,
            messages,
            params,
            adapters,
            key_id,
            req.model,
            int(time.time()),
            req.user,
        )

    # --- running ---------------------------------------------------------------------------------

    def start(self, p: Prepared, stream: bool = True) -> Running:
        """Submit the request's sequences; 503 when the engine refuses them (it is stopping).

        ``stream=False``: only each sequence's last event reaches the queue (the answer is read off the
        sequence), so the event loop is not woken, and the engine thread does not wait for the GIL, per token.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()
        seqs = []
        for i in range(len(p.response_ids)):
            params = p.params
            if params.seed is not None and i > 0:  # n answers from one seed must still differ
                params = params.model_copy(update={"seed": params.seed + i})

            def emit(event: TokenEvent, i: int = i) -> None:
                if stream or event.finish_reason is not None:
                    loop.call_soon_threadsafe(queue.put_nowait, (i, event))

            seqs.append(Sequence(prompt_ids=p.prompt_ids, params=params, emit=emit, adapter=p.adapters[i]))
        try:
            for seq in seqs:
                self.rt.engine.submit(seq)
        except RuntimeError as exc:
            for seq in seqs:  # the ones already submitted, if any, stop at their next step
                self.rt.engine.cancel(seq)
            raise APIError(503, f"server is not accepting requests: {exc}", code="unavailable") from exc
        metrics.IN_FLIGHT.inc()
        return Running(seqs, queue)

    def _records(self, p: Prepared, seqs: list[Sequence]) -> list[StoredCompletion]:
        now = time.time()
        return [
            StoredCompletion(
                response_id=rid,
                completion_id=p.completion_id,
                api_key_id=p.key_id,
                user=p.user,
                answered_at=now,
                base_model=self.rt.model_id,
                base_fingerprint=self.rt.fingerprint,
                adapter_version=seq.adapter,
                messages=p.messages,
                prompt_token_ids=p.prompt_ids,
                response_token_ids=seq.tokens,
                behaviour_logprobs=seq.logprobs,
                sampling=seq.params,
                finish_reason=seq.finish_reason,
                text=seq.text,
                n=len(seqs),
                engine=self.rt.settings.engine,
            )
            for rid, seq in zip(p.response_ids, seqs, strict=True)
        ]

    async def _store(self, p: Prepared, seqs: list[Sequence]) -> None:
        await asyncio.to_thread(self.rt.store.put_many, self._records(p, seqs))

    def _logprobs(self, tokens: list[int], logprobs: list[float]) -> ChoiceLogprobs:
        tok = self.rt.tokenizer
        return ChoiceLogprobs(
            content=[
                TokenLogprob(token=(s := tok.decode([t])), logprob=lp, bytes=list(s.encode()))
                for t, lp in zip(tokens, logprobs, strict=True)
            ]
        )

    async def complete(self, req: ChatCompletionRequest, p: Prepared) -> ChatCompletion:
        running = self.start(p, stream=False)
        seqs, queue = running.seqs, running.queue
        try:
            pending = len(seqs)
            while pending:
                _, event = await queue.get()
                if event.error:
                    raise APIError(503, event.error, code="generation_failed")
                if event.finish_reason is not None:
                    pending -= 1
        except BaseException:
            for seq in seqs:
                self.rt.engine.cancel(seq)
            raise
        finally:
            metrics.IN_FLIGHT.dec()
        await self._store(p, seqs)
        choices = [
            Choice(
                index=i,
                message=AssistantMessage(content=seq.text),
                finish_reason=seq.finish_reason,
                logprobs=self._logprobs(seq.tokens, seq.logprobs) if req.logprobs else None,
                response_id=p.response_ids[i],
            )
            for i, seq in enumerate(seqs)
        ]
        generated = sum(len(s.tokens) for s in seqs)
        return ChatCompletion(
            id=p.completion_id,
            created=p.created,
            model=p.model_name,
            system_fingerprint=f"thumbtune-{p.adapter}",
            choices=choices,
            adapter_version=p.adapter,
            usage=Usage(
                prompt_tokens=len(p.prompt_ids),
                completion_tokens=generated,
                total_tokens=len(p.prompt_ids) + generated,
            ),
        )

    async def stream(self, req: ChatCompletionRequest, p: Prepared, running: Running) -> AsyncIterator[str]:
        """The SSE body of a started request (`start`)."""
        seqs, queue = running.seqs, running.queue

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
            body = ChatCompletionChunk(
                id=p.completion_id,
                created=p.created,
                model=p.model_name,
                system_fingerprint=f"thumbtune-{p.adapter}",
                choices=choices,
                usage=usage,
            )
            return f"data: {body.model_dump_json(exclude_none=usage is None)}\n\n"

        try:
            yield chunk(
                [
                    ChunkChoice(index=i, delta=Delta(role="assistant", content=""), response_id=rid)
                    for i, rid in enumerate(p.response_ids)
                ]
            )
            pending = len(seqs)
            while pending:
                i, event = await queue.get()
                if event.error:
                    yield f"data: {json.dumps(error_body(503, event.error, code='generation_failed'))}\n\n"
                    break
                if event.finish_reason is not None:
                    pending -= 1
                    if pending == 0:  # rateable before the client sees the end
                        await self._store(p, seqs)
                if event.token_id is None and event.finish_reason is None:
                    continue
                lp = (
                    self._logprobs([event.token_id], [event.logprob])
                    if req.logprobs and event.token_id is not None
                    else None
                )
                if event.text or event.finish_reason or lp:
                    yield chunk(
                        [
                            ChunkChoice(
                                index=i,
                                delta=Delta(content=event.text or None),
                                logprobs=lp,
                                finish_reason=event.finish_reason,
                                response_id=p.response_ids[i],
                            )
                        ]
                    )
            if req.stream_options and req.stream_options.include_usage:
                generated = sum(len(s.tokens) for s in seqs)
                yield chunk(
                    [],
                    Usage(
                        prompt_tokens=len(p.prompt_ids),
                        completion_tokens=generated,
                        total_tokens=len(p.prompt_ids) + generated,
                    ),
                )
            yield "data: [DONE]\n\n"
        finally:
            for seq in seqs:
                if seq.finish_reason is None:
                    self.rt.engine.cancel(seq)
            metrics.IN_FLIGHT.dec()
