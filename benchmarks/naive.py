"""Baselines for `thumbtune bench serve`, each run in its own process by benchmarks.serve.

* ``serve``: a naive OpenAI-ish chat server over the same model: one request at a time
  under a lock, HF ``model.generate`` (greedy), the same chat template and usage fields.
* ``ceiling``: raw batched greedy decoding with no server: left-padded prompts, one
  prefill, then a manual decode loop on a DynamicCache for max_tokens steps, no EOS stop.

Both encode prompts as the thumbtune server does (thumbtune.core.chat.encode_chat).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from transformers import DynamicCache

from benchmarks.common import load
from benchmarks.prompts import SERVE as PROMPTS
from thumbtune.core.chat import encode_chat, user_turn
from thumbtune.core.settings import Settings

# --- the naive server ---------------------------------------------------------------------------------


def serve(port: int) -> None:
    base = load(Settings())
    model, tok = base.model, base.tokenizer
    # One worker thread = one request at a time (and one malloc arena, unlike a lock over a thread pool).
    worker = ThreadPoolExecutor(max_workers=1)
    app = FastAPI()

    async def readyz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ready"})

    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        messages = [{"role": m["role"], "content": m["content"]} for m in body["messages"]]
        max_tokens = int(body.get("max_tokens") or 256)

        def generate() -> tuple[list[int], list[int]]:
            ids = encode_chat(tok, messages)
            input_ids = torch.tensor([ids], dtype=torch.long)
            with torch.inference_mode():
                out = model.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    do_sample=False,
                    max_new_tokens=max_tokens,
                    pad_token_id=tok.pad_token_id,
                )
            return ids, out[0, input_ids.shape[1] :].tolist()

        prompt, completion = await asyncio.get_running_loop().run_in_executor(worker, generate)
        text = tok.decode(completion, skip_special_tokens=True)
        finish = "stop" if completion and completion[-1] == tok.eos_token_id else "length"
        return JSONResponse(
            {
                "id": "naive",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": "naive",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                ],
                "usage": {
                    "prompt_tokens": len(prompt),
                    "completion_tokens": len(completion),
                    "total_tokens": len(prompt) + len(completion),
                },
            }
        )

    # Plain Starlette routes: FastAPI would try to resolve the string annotations of these closures.
    app.router.add_route("/readyz", readyz, methods=["GET"])
    app.router.add_route("/v1/chat/completions", chat, methods=["POST"])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --- the ceiling ------------------------------------------------------------------------------------------


def ceiling(max_tokens: int, batches: list[int], repeats: int) -> dict:
    """Greedy batched decode, no server: tokens/s = batch * max_tokens / time (best of `repeats`)."""
    base = load(Settings())
    model, tok = base.model, base.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def one_run(batch: int, steps: int) -> tuple[float, float]:
        prompts = [encode_chat(tok, user_turn(PROMPTS[i % len(PROMPTS)])) for i in range(batch)]
        width = max(len(p) for p in prompts)
        ids = torch.full((batch, width), pad, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        lengths = mask.sum(-1, keepdim=True)
        with torch.inference_mode():
            t0 = time.perf_counter()
            cache = DynamicCache()
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t1 = time.perf_counter()
            for step in range(steps - 1):  # the prefill gave token 1 of `steps`
                mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype)], dim=1)
                out = model(
                    input_ids=nxt,
                    attention_mask=mask,
                    position_ids=lengths + step,
                    past_key_values=cache,
                    use_cache=True,
                )
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    one_run(max(batches), 4)  # warm-up
    results = {}
    for batch in batches:
        best = min((one_run(batch, max_tokens) for _ in range(repeats)), key=sum)
        prefill_s, decode_s = best
        results[str(batch)] = {
            "batch": batch,
            "steps": max_tokens,
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "tok_s": batch * max_tokens / (prefill_s + decode_s),
            "decode_only_tok_s": batch * (max_tokens - 1) / decode_s if max_tokens > 1 else None,
        }
    return {"threads": torch.get_num_threads(), "runs": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.naive")
    sub = parser.add_subparsers(dest="mode", required=True)
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("--port", type=int, required=True)
    p_ceil = sub.add_parser("ceiling")
    p_ceil.add_argument("--max-tokens", type=int, default=64)
    p_ceil.add_argument("--batches", default="1,16")
    p_ceil.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if args.mode == "serve":
        serve(args.port)
    else:
        result = ceiling(args.max_tokens, [int(b) for b in args.batches.split(",")], args.repeats)
        sys.stdout.write("CEILING " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
