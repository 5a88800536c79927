"""The generation engine: continuous batching over a shared KV cache, one thread, no HTTP.

A scheduler thread owns the model. Each iteration it
  1. admits waiting sequences (up to max_batch_size running), prefilling them together,
  2. runs one decode step for every running sequence,
  3. retires finished or cancelled sequences, freeing their rows and cache columns.
Every sequence keeps its own sampling parameters, stop conditions and adapter; a batch
mixing adapters runs through peft's per-row ``adapter_names``. For every generated token
the engine emits the token id and its behaviour log-prob (see service.engine.sampling).

Anything else that touches the model (loading or unloading an adapter, a probe forward) goes
through `Engine.call`: the function runs on the scheduler thread between two steps (at once
when idle), so it never races a forward pass. Keep such commands short: every running
sequence waits for them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import DynamicCache

from service import metrics
from service.engine import kv
from service.engine.registry import AdapterRegistry
from service.engine.sampling import make_generator, sample
from service.engine.text import Detokenizer
from thumbtune.core.chat import end_token_ids
from thumbtune.core.contract import SamplingParams

log = logging.getLogger(__name__)

T = TypeVar("T")


class ProofFailed(Exception):
    """An engine that generates elsewhere (vLLM) does not serve the weights it was given."""


@dataclass
class TokenEvent:
    """What the engine hands back for each generated token (and once more on failure)."""

    token_id: int | None
    logprob: float | None
    text: str
    finish_reason: str | None = None
    """'stop' or 'length' on a sequence's last token; 'error' or 'cancelled' without a token."""
    error: str | None = None


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[TokenEvent], None]
    adapter: str = ""
    """Adapter version this sequence runs on ('base' = adapter off); '' = the live one at admission."""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    _last_token_at: float = 0.0
    _detok: Detokenizer | None = None
    _generator: torch.Generator | None = None

    @property
    def text(self) -> str:
        return self._detok.emitted if self._detok else ""


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        adapters: AdapterRegistry,
        *,
        max_batch_size: int = 16,
        max_context: int = 2048,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.max_batch_size = max_batch_size
        self.max_context = max_context
        self.eos_ids = set(end_token_ids(model, tokenizer))
        self._pad_id = tokenizer.pad_token_id
        self._waiting: deque[Sequence] = deque()
        self._commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self._wakeup = threading.Condition()
        self._running: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    # --- public API (any thread) ---------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="thumbtune-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish running sequences, fail waiting ones, then stop the thread."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread:
            self._thread.join(timeout)

    def submit(self, seq: Sequence) -> None:
        if len(seq.prompt_ids) + seq.params.max_tokens > self.max_context:
            raise ValueError("prompt plus max_tokens exceeds the context window")
        with self._wakeup:
            if self._stopping:
                raise RuntimeError("engine is shutting down")
            self._waiting.append(seq)
            metrics.QUEUE_DEPTH.set(len(self._waiting))
            self._wakeup.notify()

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn()`` on the engine thread between two steps (no forward pass runs meanwhile).

        It runs with autograd off (no_grad, outside inference mode, so tensors it creates, such as
        adapter weights, are ordinary ones). The future holds its result or its exception.
        """
        future: Future[T] = Future()
        with self._wakeup:
            if self._stopping or not self.alive:
                raise RuntimeError("engine is not running")
            self._commands.append((fn, future))
            self._wakeup.notify()
        return future

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True

    def wake(self) -> None:
        """Wake the scheduler if it sleeps idle, so it unloads versions nobody uses any more now."""
        with self._wakeup:
            self._wakeup.notify()

    def install(self, version: str, directory: Path) -> None:
        """Make a loaded, checked version servable by this engine. The embedded engine serves from the model
        the version was loaded into, so there is nothing to do (`VLLMEngine.install` loads it into vLLM and
        proves it is served, or raises `ProofFailed`)."""

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- scheduler thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                admitted = self._admit()
                if admitted is None:
                    self._fail_commands()
                    return
                self._run_commands()
                try:
                    if admitted:
                        self._prefill(admitted)
                    if self._running:
                        self._decode()
                except Exception as exc:  # a failed step must fail its requests, not the engine
                    log.exception("generation step failed")
                    for seq in self._running + (admitted or []):
                        if seq.finish_reason is None:
                            seq.finish_reason = "error"
                            seq.emit(TokenEvent(None, None, "", "error", f"generation failed: {exc}"))
                    self._running, self._cache, self._mask = [], None, None
                self.adapters.collect(in_use=self._in_use())

    def _run_commands(self) -> None:
        with self._wakeup:
            commands, self._commands = list(self._commands), deque()
        for fn, future in commands:
            if not future.set_running_or_notify_cancel():
                continue
            try:
                with torch.inference_mode(False), torch.no_grad():
                    future.set_result(fn())
            except Exception as exc:  # noqa: BLE001 - whatever it raised, the caller gets it from the future
                future.set_exception(exc)

    def _fail_commands(self) -> None:
        with self._wakeup:
            commands, self._commands = list(self._commands), deque()
        for _, future in commands:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("engine stopped before the command ran"))

    def _in_use(self) -> set[str]:
        """Adapter names some waiting or running sequence is bound to ('' = whatever is live)."""
        with self._wakeup:
            waiting = {s.adapter for s in self._waiting}
        return waiting | {s.adapter for s in self._running}

    def _admit(self) -> list[Sequence] | None:
        """Waiting sequences that fit; blocks while idle. None once stopping and drained."""
        with self._wakeup:
            while not self._waiting and not self._running and not self._commands:
                if self._stopping:
                    return None
                if self.adapters.retiring():  # idle: wake up now and then to unload retired versions
                    self._wakeup.wait(1.0)
                    return []
                self._wakeup.wait()
            if self._stopping:
                for seq in self._waiting:
                    seq.finish_reason = "error"
                    seq.emit(TokenEvent(None, None, "", "error", "server is shutting down"))
                self._waiting.clear()
                return []
            room = self.max_batch_size - len(self._running)
            admitted = []
            while self._waiting and len(admitted) < room:
                seq = self._waiting.popleft()
                if seq.cancelled:
                    seq.emit(TokenEvent(None, None, "", "cancelled"))
                    continue
                admitted.append(seq)
            metrics.QUEUE_DEPTH.set(len(self._waiting))
        for seq in admitted:
            seq.adapter = self.adapters.acquire(seq.adapter)
            seq._detok = Detokenizer(self.tokenizer, seq.params.stop)
            seq._generator = make_generator(seq.params.seed)
        return admitted

    def _forward(self, seqs: list[Sequence], **inputs) -> torch.Tensor:
        with self.adapters.routing([s.adapter for s in seqs]) as extra:
            out = self.model(**inputs, **extra, use_cache=True)
        return out.logits[:, -1].float()

    def _prefill(self, seqs: list[Sequence]) -> None:
        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, width - len(seq.prompt_ids) :] = torch.tensor(seq.prompt_ids)
            mask[i, width - len(seq.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(
            seqs,
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            logits_to_keep=1,
        )
        metrics.PROMPT_TOKENS.inc(sum(len(s.prompt_ids) for s in seqs))
        if self._running:
            self._cache, self._mask = kv.merge(self._cache, self._mask, cache, mask)
        else:
            self._cache, self._mask = cache, mask
        self._running.extend(seqs)
        self._sample_and_emit(logits, first=len(self._running) - len(seqs))

    def _decode(self) -> None:
        seqs = self._running
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], dtype=torch.long)
        mask = torch.cat([self._mask, torch.ones((len(seqs), 1), dtype=self._mask.dtype)], dim=1)
        positions = torch.tensor([[len(s.prompt_ids) + len(s.tokens) - 1] for s in seqs], dtype=torch.long)
        logits = self._forward(
            seqs, input_ids=ids, attention_mask=mask, position_ids=positions, cache=self._cache
        )
        self._mask = mask
        metrics.BATCH_SIZE.observe(len(seqs))
        self.steps += 1
        self._sample_and_emit(logits, first=0)

    def _sample_and_emit(self, logits: torch.Tensor, first: int) -> None:
        """Sample for rows first.. of the running batch, emit their tokens, retire finished rows."""
        seqs = self._running[first:]
        tokens, logprobs = sample(
            logits,
            [s.params.temperature for s in seqs],
            [s.params.top_p for s in seqs],
            [s._generator for s in seqs],
        )
        now = time.perf_counter()
        for seq, tok, lp in zip(seqs, tokens.tolist(), logprobs.tolist(), strict=True):
            self._append(seq, tok, lp, now)
        keep = [i for i, s in enumerate(self._running) if s.finish_reason is None and not s.cancelled]
        for seq in self._running:
            if seq.cancelled and seq.finish_reason is None:
                seq.finish_reason = "cancelled"
                seq.emit(TokenEvent(None, None, "", "cancelled"))
        if len(keep) < len(self._running):
            if keep:
                self._cache, self._mask = kv.select(self._cache, self._mask, torch.tensor(keep))
            else:
                self._cache, self._mask = None, None
            self._running = [self._running[i] for i in keep]

    def _append(self, seq: Sequence, token: int, logprob: float, now: float) -> None:
        append_token(seq, token, logprob, now, self.eos_ids, self.max_context)


def append_token(
    seq: Sequence, token: int, logprob: float, now: float, eos_ids: set[int], max_context: int
) -> None:
    """Record a generated token on its sequence, decide whether it ends the answer (end-of-turn id,
    max_tokens, the context window, a stop string) and emit its event: every engine adds tokens this way."""
    if seq.cancelled:
        return
    if not seq.tokens:
        metrics.TIME_TO_FIRST_TOKEN.observe(now - seq.submitted_at)
    else:
        metrics.INTER_TOKEN_LATENCY.observe(now - seq._last_token_at)
    seq._last_token_at = now
    seq.tokens.append(token)
    seq.logprobs.append(logprob)
    metrics.GENERATED_TOKENS.labels(seq.adapter).inc()
    finish = None
    if token in eos_ids:
        finish = "stop"
    elif len(seq.tokens) >= seq.params.max_tokens or len(seq.prompt_ids) + len(seq.tokens) >= max_context:
        finish = "length"
    delta, hit_stop = seq._detok.add(token, final=finish is not None)
    if hit_stop:
        finish = "stop"
    seq.finish_reason = finish
    seq.emit(TokenEvent(token, logprob, delta, finish))
