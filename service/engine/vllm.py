"""Generation through a vLLM server: the same `Sequence`s, token ids and behaviour log-probs, vLLM's batching.

With ``THUMBTUNE_ENGINE=vllm`` the thumbtune server keeps everything but the sampling: the API, the
completion store, feedback and events, the adapter checks, canaries and admin. Each sequence becomes one
streamed request to vLLM's OpenAI completions API, with

    prompt = the prompt's token ids    (vLLM sees exactly the tokens the store keeps)
    logprobs = 0, return_tokens_as_token_ids = true
                                       (every token comes back as ``token_id:<id>`` with its log-prob)
    model = thumbtune@vN               (the version; ``base`` and ``v0`` are the base model's own name)

Log-probs. vLLM started with ``--logprobs-mode processed_logprobs`` (as `thumbtune vllm` starts it) returns
log_softmax(z / T) after top-k / top-p, computed in float32 from its own forward pass. At top_p = 1 that is
the contract's log pi_b(a_t | s_t) = log_softmax(z_t / T)[a_t] (thumbtune/core/contract.py); below 1 it is the
log-prob of the truncated distribution the token was drawn from, which is >= the contract's. Events say which
engine served them (``FeedbackEvent.engine``); docs/BENCHMARKS.md measures |log pi_vllm - log pi_learner|.

Stop strings are applied here with the embedded engine's `Detokenizer` (a hit closes the stream, which
aborts the request in vLLM), so both engines end answers at the same token; vLLM stops at the end-of-turn
ids itself (``stop_token_ids``).

Versions. Adapters are loaded into this server's own copy of the model first (the embedded engine, which
serves no requests here: the files, KL and capability checks run on it), then into vLLM by `install` under
an immutable name:
  1. POST /v1/load_lora_adapter {lora_name: thumbtune@vN, lora_path: the version's directory}
     (vLLM reads the directory: it must see the same adapter store path, e.g. the same volume),
  2. POST /reset_prefix_cache (exists when vLLM runs with VLLM_SERVER_DEV_MODE=1, as `thumbtune vllm`
     starts it; without it, immutable names are what keep one version's cached prefixes from another's),
  3. the proof: the log-probs vLLM gives a fixed answer under the new name (``prompt_logprobs``) must match
     the local copy's under the same version, max |difference| <= THUMBTUNE_VLLM_PROOF_MAX_DIFF, or
     `ProofFailed` (the version is refused, reason ``proof``). Start-up proves the base model the same way,
     so a vLLM serving another model is an error at start-up.
A version the registry unloads (no request uses it any more) is unloaded from vLLM too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import httpx
import torch

from service import metrics
from service.engine.engine import Engine, ProofFailed, Sequence, TokenEvent, append_token
from service.engine.registry import BASE
from service.engine.text import Detokenizer
from thumbtune.core.chat import encode_chat, user_turn
from thumbtune.core.contract import BASE_VERSION, MIN_TEMPERATURE
from thumbtune.core.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
VERSION_PREFIX = "thumbtune@"
"""vLLM's name for version vN is thumbtune@vN: never reused for other weights."""
PROOF = ("What is the capital of France?", "The capital of France is Paris, on the river Seine.")
"""(user prompt, answer) whose log-probs prove which weights vLLM serves."""
READY_TIMEOUT_S = 600.0
REQUEST_TIMEOUT_S = 120.0
COLLECT_EVERY_S = 1.0


def served_name(version: str, base_name: str) -> str:
    """What vLLM calls ``version``: the base model's name for the base and the empty adapter v0."""
    return base_name if version in (BASE, BASE_VERSION) else f"{VERSION_PREFIX}{version}"


def local_logprobs(engine: Engine, ids: list[int], keep: int, version: str) -> list[float]:
    """log pi(ids[t] | ids[:t]) of the last ``keep`` tokens under ``version``, local copy (engine thread).

    What the learner computes for a saved version (temperature 1, float32 log-softmax of the logits).
    """
    registry = engine.adapters
    name = BASE if version == BASE_VERSION else version
    with registry.routing([name]) as extra:
        out = registry.model(input_ids=torch.tensor([ids]), logits_to_keep=keep + 1, use_cache=False, **extra)
    logp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
    return logp.gather(1, torch.tensor(ids[-keep:])[:, None]).squeeze(1).tolist()


class VLLMEngine:
    """`Engine`'s interface (submit, cancel, call, start, stop, alive) over a vLLM server."""

    def __init__(self, checker: Engine, settings: Settings) -> None:
        if not settings.vllm_url:
            raise ValueError("THUMBTUNE_ENGINE=vllm needs THUMBTUNE_VLLM_URL (thumbtune up sets it)")
        self.checker = checker
        self.adapters = checker.adapters
        self.tokenizer = checker.tokenizer
        self.max_context = checker.max_context
        self.eos_ids = checker.eos_ids
        self.url = settings.vllm_url.rstrip("/")
        self.max_diff = settings.vllm_proof_max_diff
        key = settings.vllm_api_key.get_secret_value() if settings.vllm_api_key else None
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.url, headers=self._headers, timeout=REQUEST_TIMEOUT_S)
        self.base_name = ""
        """The base model's name in vLLM (its first model that is not an adapter)."""
        self.reset_prefix_cache = True
        """False once vLLM answered 404 to /reset_prefix_cache (its dev routes are off)."""
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._client: httpx.AsyncClient | None = None
        self._running: dict[int, tuple[Sequence, Future]] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self.proofs: dict[str, tuple[float, float]] = {}
        """version -> (max, mean) |log pi_vllm - log pi_local| of its proof."""
        self.adapters.in_use_elsewhere = self._in_use
        self.adapters.on_unload = self._unload

    # --- life -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.checker.start()
        self._thread = threading.Thread(target=self._run_loop, name="thumbtune-vllm", daemon=True)
        self._thread.start()
        self.base_name = self._wait_ready()
        prompt, answer = PROOF
        self._proof_ids = encode_chat(self.tokenizer, user_turn(prompt))
        self._proof_keep = len(self.tokenizer.encode(answer, add_special_tokens=False))
        self._proof_ids = self._proof_ids + self.tokenizer.encode(answer, add_special_tokens=False)
        worst, mean = self.prove(BASE_VERSION)
        log.info(
            "generating through vLLM at %s (base model %r; proof of the base: max |dlogp| %.2e, mean %.2e)",
            self.url,
            self.base_name,
            worst,
            mean,
        )

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._client = httpx.AsyncClient(
            base_url=self.url,
            headers=self._headers,
            timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        self._loop.call_soon(self._collect)
        self._loop.run_forever()

    def _collect(self) -> None:
        """Every second: the checker engine generates nothing here, so nothing else wakes it to unload (and
        unload from vLLM) the versions no request uses any more."""
        if self.adapters.retiring():
            self.checker.wake()
        self._loop.call_later(COLLECT_EVERY_S, self._collect)

    def _wait_ready(self) -> str:
        deadline, said = time.monotonic() + READY_TIMEOUT_S, 0.0
        while True:
            try:
                models = self._http.get("/v1/models", timeout=5.0)
                models.raise_for_status()
                bases = [m for m in models.json()["data"] if not m["id"].startswith(VERSION_PREFIX)]
                if bases:
                    if bases[0].get("max_model_len"):  # requests must fit vLLM's window too
                        self.max_context = min(self.max_context, int(bases[0]["max_model_len"]))
                    return bases[0]["id"]
                raise RuntimeError(f"the vLLM server at {self.url} lists no base model")
            except httpx.HTTPError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no vLLM server answers at {self.url}: {exc}") from exc
                if time.monotonic() - said > 10:
                    log.info("waiting for the vLLM server at %s (%s)", self.url, exc)
                    said = time.monotonic()
                time.sleep(0.5)

    def stop(self, timeout: float = 30.0) -> None:
        """Let running sequences finish (up to ``timeout``), cancel the rest, then stop."""
        with self._lock:
            self._stopping = True
        deadline = time.monotonic() + timeout
        while self._running and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            running = list(self._running.values())
        for seq, future in running:
            seq.cancelled = True
            future.cancel()
        if self._thread is not None and self._thread.is_alive():
            if self._client is not None:
                asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self.checker.stop(timeout)  # its last collect may still unload versions from vLLM: before the close
        self.adapters.on_unload = None
        self._http.close()

    @property
    def alive(self) -> bool:
        return self.checker.alive and self._thread is not None and self._thread.is_alive()

    # --- requests ------------------------------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        if len(seq.prompt_ids) + seq.params.max_tokens > self.max_context:
            raise ValueError("prompt plus max_tokens exceeds the context window")
        with self._lock:
            if self._stopping or not self.alive:
                raise RuntimeError("engine is shutting down")
            seq.adapter = self.adapters.acquire(seq.adapter)
            seq._detok = Detokenizer(self.tokenizer, seq.params.stop)
            future = asyncio.run_coroutine_threadsafe(self._generate(seq), self._loop)
            self._running[id(seq)] = (seq, future)
        future.add_done_callback(lambda _: self._finished(seq))

    def _finished(self, seq: Sequence) -> None:
        with self._lock:
            self._running.pop(id(seq), None)

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        entry = self._running.get(id(seq))
        if entry is not None:
            entry[1].cancel()  # cancels the task: its stream closes, and vLLM aborts the request

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Loads and probes run on the local copy (the checker engine's thread)."""
        return self.checker.call(fn)

    def _in_use(self) -> set[str]:
        with self._lock:
            return {seq.adapter for seq, _ in self._running.values()}

    def _body(self, seq: Sequence) -> dict[str, Any]:
        p = seq.params
        return {
            "model": served_name(seq.adapter, self.base_name),
            "prompt": seq.prompt_ids,
            "max_tokens": p.max_tokens,
            "temperature": max(p.temperature, MIN_TEMPERATURE) if p.temperature > 0 else 0.0,
            "top_p": p.top_p,
            "seed": p.seed,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
            "stop_token_ids": sorted(self.eos_ids),
            "stream": True,
        }

    async def _generate(self, seq: Sequence) -> None:
        metrics.PROMPT_TOKENS.inc(len(seq.prompt_ids))
        try:
            async with self._client.stream("POST", "/v1/completions", json=self._body(seq)) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode(errors="replace")[:500]
                    raise RuntimeError(f"vLLM answered {response.status_code}: {detail}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    if self._take(seq, json.loads(line[6:])):
                        return
            if seq.finish_reason is None:
                raise RuntimeError("vLLM ended the stream before the answer ended")
        except asyncio.CancelledError:
            if seq.finish_reason is None:
                seq.finish_reason = "cancelled"
                seq.emit(TokenEvent(None, None, "", "cancelled"))
            raise
        except Exception as exc:  # noqa: BLE001 - whatever failed, the request gets it
            if seq.finish_reason is None:
                log.warning("generation through vLLM failed: %r", exc)
                seq.finish_reason = "error"
                seq.emit(TokenEvent(None, None, "", "error", f"generation failed: {exc}"))

    def _take(self, seq: Sequence, chunk: dict) -> bool:
        """Emit a streamed chunk's tokens; True once the sequence has ended (or was cancelled)."""
        if "error" in chunk:
            raise RuntimeError(f"vLLM: {chunk['error']}")
        for choice in chunk.get("choices", []):
            lp = choice.get("logprobs") or {}
            for token, logprob in zip(lp.get("tokens") or [], lp.get("token_logprobs") or [], strict=True):
                if seq.cancelled:
                    return True
                token_id, now = int(token.removeprefix("token_id:")), time.perf_counter()
                append_token(seq, token_id, float(logprob), now, self.eos_ids, self.max_context)
                if seq.finish_reason is not None:
                    return True
            if choice.get("finish_reason") is not None and seq.finish_reason is None:
                # vLLM ended the answer on a token we did not (a stop id we were not told of): end it here
                self._finish(seq, "length" if choice["finish_reason"] == "length" else "stop")
                return True
        return False

    def _finish(self, seq: Sequence, reason: str) -> None:
        delta, _ = seq._detok.add(seq.tokens[-1], final=True) if seq.tokens else ("", False)
        seq.finish_reason = reason
        seq.emit(TokenEvent(None, None, delta, reason))

    # --- versions ------------------------------------------------------------------------------------------

    def install(self, version: str, directory: Path) -> tuple[float, float]:
        """Load a checked version into vLLM under its immutable name and prove it is served.

        Returns the proof's (max, mean) |log pi_vllm - log pi_local|; raises `ProofFailed`.
        """
        name = served_name(version, self.base_name)
        try:
            loaded = self._http.post(
                "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(directory)}
            )
        except httpx.HTTPError as exc:
            raise ProofFailed(f"vLLM at {self.url} could not be asked to load {name}: {exc}") from exc
        if loaded.status_code != 200 and "already been loaded" not in loaded.text:
            raise ProofFailed(
                f"vLLM refused to load {name} from {directory}: {loaded.status_code} {loaded.text}"
            )
        if self.reset_prefix_cache:
            reset = self._http.post("/reset_prefix_cache")
            if reset.status_code == 404:
                self.reset_prefix_cache = False
                log.warning(
                    "vLLM at %s has no /reset_prefix_cache (VLLM_SERVER_DEV_MODE is off): versions keep "
                    "their cached prefixes apart by their immutable names only",
                    self.url,
                )
        try:
            return self.prove(version)
        except ProofFailed:
            self._unload(version)
            raise

    def prove(self, version: str) -> tuple[float, float]:
        """Compare vLLM's log-probs of the proof answer under ``version`` with the local copy's."""
        name = served_name(version, self.base_name)
        ids, keep = self._proof_ids, self._proof_keep
        expected = self.checker.call(lambda: local_logprobs(self.checker, ids, keep, version)).result(
            REQUEST_TIMEOUT_S
        )
        body = {"model": name, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
        try:
            answer = self._http.post("/v1/completions", json=body)
            answer.raise_for_status()
            positions = answer.json()["choices"][0]["prompt_logprobs"][-keep:]
            served = [
                float(pos[str(tok)]["logprob"]) for pos, tok in zip(positions, ids[-keep:], strict=True)
            ]
        except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
            raise ProofFailed(f"vLLM could not score the proof answer under {name}: {exc!r}") from exc
        diffs = [abs(a - b) for a, b in zip(served, expected, strict=True)]
        worst, mean = max(diffs), sum(diffs) / len(diffs)
        metrics.VLLM_PROOF_DIFF.set(worst)
        if worst > self.max_diff:
            raise ProofFailed(
                f"vLLM serves {name} with log-probs up to {worst:.4f} nats (mean {mean:.4f}) away from "
                f"{version}'s on the proof answer > THUMBTUNE_VLLM_PROOF_MAX_DIFF = {self.max_diff}: it does "
                "not serve these weights"
            )
        self.proofs[version] = (worst, mean)
        return worst, mean

    def _unload(self, version: str) -> None:
        """Unload a version from vLLM (the registry unloaded it locally: nothing uses it)."""
        if version in (BASE, BASE_VERSION):
            return
        name = served_name(version, self.base_name)
        try:
            self._http.post("/v1/unload_lora_adapter", json={"lora_name": name})
        except (httpx.HTTPError, RuntimeError) as exc:  # RuntimeError: the client is closed (shutting down)
            log.warning("could not unload %s from vLLM: %s", name, exc)
