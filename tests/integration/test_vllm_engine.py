"""`VLLMEngine` against a scripted stand-in for vLLM's HTTP API (runs without vLLM installed).

What the real vLLM cannot be made to do on cue: tokens arriving several per chunk, a stop string in the middle
of a chunk, an error answer, a smaller context window, a server without /reset_prefix_cache, and log-probs off
by a chosen amount (the proof). tests/integration/test_vllm.py runs the real one.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.engine.engine import Engine, ProofFailed, Sequence, TokenEvent
from service.engine.registry import AdapterRegistry, with_empty_adapter
from service.engine.vllm import VLLMEngine, local_logprobs
from tests.support.adapters import VersionWriter
from thumbtune.cli.process import free_port
from thumbtune.core.contract import ADAPTER_WEIGHTS, SamplingParams
from thumbtune.core.settings import Settings
from thumbtune.core.store import LocalAdapterStore

pytestmark = pytest.mark.usefixtures("single_thread")


class FakeVLLM:
    """vLLM's routes as thumbtune uses them; ``script`` is what the next completion streams."""

    def __init__(self, checker: Engine) -> None:
        self.checker = checker
        self.script: list[list[tuple[int, float]]] = []
        self.finish = "stop"
        self.status = 200
        self.offset = 0.0
        self.calls: list[tuple[str, dict]] = []
        self.app = FastAPI()
        self.app.get("/v1/models")(self.models)
        self.app.post("/v1/completions")(self.completions)
        self.app.post("/v1/load_lora_adapter")(self.load)
        self.app.post("/v1/unload_lora_adapter")(self.unload)

    async def models(self) -> dict:
        return {"data": [{"id": "base-model", "max_model_len": 300}]}

    async def load(self, request: Request) -> JSONResponse:
        self.calls.append(("load", await request.json()))
        return JSONResponse("ok")

    async def unload(self, request: Request) -> JSONResponse:
        self.calls.append(("unload", await request.json()))
        return JSONResponse("ok")

    async def completions(self, request: Request):  # noqa: ANN201
        body = await request.json()
        self.calls.append(("completions", body))
        if self.status != 200:
            return JSONResponse({"error": {"message": "bad request"}}, status_code=self.status)
        if "prompt_logprobs" in body:  # the proof: the local copy's log-probs, shifted by `offset`
            ids, version = body["prompt"], body["model"].removeprefix("thumbtune@")
            keep = len(ids) - 1
            version = "v0" if version == "base-model" else version
            lps = self.checker.call(lambda: local_logprobs(self.checker, ids, keep, version)).result(30)
            shifted = [lp + self.offset for lp in lps]
            positions = [None] + [{str(t): {"logprob": lp}} for t, lp in zip(ids[1:], shifted, strict=True)]
            return {"choices": [{"prompt_logprobs": positions}]}

        def stream() -> Iterator[str]:
            for i, chunk in enumerate(self.script):
                last = i == len(self.script) - 1
                choice = {
                    "logprobs": {
                        "tokens": [f"token_id:{t}" for t, _ in chunk],
                        "token_logprobs": [lp for _, lp in chunk],
                    },
                    "finish_reason": self.finish if last else None,
                }
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")


@pytest.fixture
def setup(tiny_model_dir: Path) -> Iterator[tuple[VLLMEngine, FakeVLLM]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = with_empty_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), Settings())
    checker = Engine(model, tokenizer, AdapterRegistry(model), max_context=512)
    fake = FakeVLLM(checker)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(fake.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    engine = VLLMEngine(checker, Settings(vllm_url=f"http://127.0.0.1:{port}"))
    engine.start()
    yield engine, fake
    engine.stop(timeout=5)
    server.should_exit = True
    thread.join(10)


def run(engine: VLLMEngine, text_ids: list[int], **params: object) -> tuple[Sequence, list[TokenEvent]]:
    done, events = threading.Event(), []

    def emit(event: TokenEvent) -> None:
        events.append(event)
        if event.finish_reason is not None:
            done.set()

    params = {"temperature": 1.0, "top_p": 1.0} | params
    seq = Sequence(prompt_ids=text_ids, params=SamplingParams(**params), emit=emit)
    engine.submit(seq)
    assert done.wait(30)
    return seq, events


def test_start_up_proves_the_base_and_takes_vllms_smaller_window(setup) -> None:  # noqa: ANN001
    engine, fake = setup
    assert engine.base_name == "base-model" and engine.max_context == 300
    assert engine.proofs["v0"][0] < 1e-6


def test_tokens_and_logprobs_come_from_the_stream_several_per_chunk(setup) -> None:  # noqa: ANN001
    engine, fake = setup
    tok = engine.tokenizer
    words = tok.encode(" one two three", add_special_tokens=False)
    eos = min(engine.eos_ids)
    fake.script = [[(words[0], -0.5), (words[1], -0.25)], [(words[2], -1.0), (eos, -0.125)]]
    seq, events = run(engine, [1, 2, 3], max_tokens=10, temperature=0.7, seed=3)
    assert seq.tokens == [*words, eos] and seq.logprobs == [-0.5, -0.25, -1.0, -0.125]
    assert seq.finish_reason == "stop" and seq.text == " one two three"
    assert "".join(e.text for e in events) == seq.text
    body = fake.calls[-1][1]
    assert body["prompt"] == [1, 2, 3] and body["model"] == "base-model" and body["seed"] == 3
    assert body["logprobs"] == 0 and body["return_tokens_as_token_ids"] and body["stream"]
    assert body["stop_token_ids"] == sorted(engine.eos_ids)


def test_a_stop_string_ends_the_answer_mid_chunk_and_max_tokens_ends_with_length(setup) -> None:  # noqa: ANN001
    engine, fake = setup
    words = engine.tokenizer.encode(" one two three four", add_special_tokens=False)
    fake.script = [[(w, -0.5) for w in words]]
    seq, _ = run(engine, [1, 2], max_tokens=10, stop=[" three"])
    assert seq.finish_reason == "stop" and seq.text == " one two"
    assert len(seq.tokens) < len(words)  # the tokens after the stop string are not kept
    fake.finish = "length"
    seq, _ = run(engine, [1, 2], max_tokens=2)
    assert seq.finish_reason == "length" and len(seq.tokens) == 2


def test_an_error_from_vllm_fails_the_request_with_its_message(setup) -> None:  # noqa: ANN001
    engine, fake = setup
    fake.status = 400
    seq, events = run(engine, [1, 2], max_tokens=4)
    assert seq.finish_reason == "error" and "vLLM answered 400" in events[-1].error
    with pytest.raises(ValueError, match="context window"):
        engine.submit(
            Sequence(
                prompt_ids=[1] * 299,
                params=SamplingParams(temperature=1.0, top_p=1.0, max_tokens=2),
                emit=lambda e: None,
            )
        )


def test_install_loads_under_the_immutable_name_and_the_proof_refuses_other_weights(
    setup,  # noqa: ANN001
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    engine, fake = setup
    store = LocalAdapterStore(tmp_path / "adapters")
    version = VersionWriter(tiny_model_dir).write(store, 0.05, seed=1)
    directory = store.directory(version)
    weights = load_file(str(directory / ADAPTER_WEIGHTS))
    engine.call(lambda: engine.adapters.load(version, directory, weights)).result(30)
    worst, mean = engine.install(version, directory)
    assert worst < 1e-6 and engine.proofs[version] == (worst, mean)
    assert ("load", {"lora_name": "thumbtune@v1", "lora_path": str(directory)}) in fake.calls
    assert not engine.reset_prefix_cache  # the stand-in has no /reset_prefix_cache: noted, not fatal
    fake.offset = 0.5 * engine.max_diff
    assert engine.prove(version)[0] == pytest.approx(0.5 * engine.max_diff, rel=1e-3)
    fake.offset = 2 * engine.max_diff
    with pytest.raises(ProofFailed, match="THUMBTUNE_VLLM_PROOF_MAX_DIFF"):
        engine.install(version, directory)
    assert fake.calls[-1] == ("unload", {"lora_name": "thumbtune@v1"})  # not left behind in vLLM
