"""`thumbtune bench serve`'s vLLM part: how far vLLM's log-probs are from the learner's.

The log-prob mismatch: answers sampled by vLLM exactly as the vLLM engine asks for them (prompt as token ids,
``logprobs=0``, ``return_tokens_as_token_ids``, top_p = 1; service/engine/vllm.py), then scored by the
learner's own forward pass (`Policy.forward_batch`, tempered log-probs, as PPO's importance ratio
pi_old / pi_b sees them) at the learner's precision here and at float32:

    d_t = |log pi_vllm(a_t | s_t) - log pi_learner(a_t | s_t)|,   mean, p99 and max over all tokens.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import torch

from benchmarks.common import load
from benchmarks.prompts import SERVE as PROMPTS
from learner.config import LearnerSettings
from learner.policy import Batch, Policy, Sample, resolve_precision
from thumbtune.core.chat import encode_chat, end_token_ids, user_turn
from thumbtune.core.settings import Settings

MISMATCH_ANSWERS = 32
MISMATCH_TEMPERATURES = (1.0, 0.7)


def sample(url: str, model: str, prompt_ids: list[int], temperature: float, max_tokens: int, stop: list[int]):
    body = {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": 1.0,
        "logprobs": 0,
        "return_tokens_as_token_ids": True,
        "stop_token_ids": stop,
    }
    choice = (
        httpx.post(f"{url}/v1/completions", json=body, timeout=300).raise_for_status().json()["choices"][0]
    )
    tokens = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
    return tokens, [float(x) for x in choice["logprobs"]["token_logprobs"]]


def logprob_mismatch(settings: Settings, url: str, model: str, max_tokens: int) -> dict:
    """|log pi_vllm - log pi_learner| on vLLM's own samples, per temperature and learner precision."""
    base = load(settings)
    stop = end_token_ids(base.model, base.tokenizer)
    samples: dict[float, list[Sample]] = {}
    with ThreadPoolExecutor(16) as pool:  # 16 at a time: vLLM batches them
        for temperature in MISMATCH_TEMPERATURES:
            prompts = [
                encode_chat(base.tokenizer, user_turn(PROMPTS[i % len(PROMPTS)]))
                for i in range(MISMATCH_ANSWERS)
            ]
            answers = pool.map(lambda p, t=temperature: sample(url, model, p, t, max_tokens, stop), prompts)
            samples[temperature] = [
                Sample(f"{i}", prompt, tokens, logprobs, temperature, 0.0)
                for i, (prompt, (tokens, logprobs)) in enumerate(zip(prompts, answers, strict=True))
            ]
    learner_precision = resolve_precision(LearnerSettings().precision, torch.device("cpu"))
    policy = Policy.fresh(base.model, settings, torch.device("cpu"))
    pad = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else stop[0]
    rows = {}
    for precision in dict.fromkeys((learner_precision, None)):
        policy.autocast_dtype = precision
        for temperature, group in samples.items():
            diffs = []
            for start in range(0, len(group), 8):
                chunk = group[start : start + 8]
                batch = Batch.from_samples(chunk, pad)
                with torch.no_grad():
                    out = policy.forward_batch(batch, with_values=False, tempered=True)
                for row, s in enumerate(chunk):
                    mine = out.tempered_logprobs[row, : len(s.response_token_ids)].float()
                    diffs += (mine - torch.tensor(s.behaviour_logprobs)).abs().tolist()
            name = "bfloat16" if precision == torch.bfloat16 else "float32"
            rows[f"T={temperature} learner {name}"] = {
                "temperature": temperature,
                "learner_precision": name,
                "tokens": len(diffs),
                "mean": float(np.mean(diffs)),
                "p99": float(np.percentile(diffs, 99)),
                "max": float(np.max(diffs)),
            }
    return rows
