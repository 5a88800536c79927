"""Per-row sampling with the behaviour log-probs the learner needs.

Each row of a batch carries its own temperature, top-p and random generator. The log-prob
recorded for the sampled token is taken from the tempered distribution *before* top-p
truncation (see thumbtune.core.contract), so it is finite for every token and the learner can
reproduce it from its own logits and the request's temperature.
"""

from __future__ import annotations

import torch

from thumbtune.core.contract import MIN_TEMPERATURE


def sample(
    logits: torch.Tensor,
    temperatures: list[float],
    top_ps: list[float],
    generators: list[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row. logits: [rows, vocab] (float32).

    Returns (tokens [rows], logprobs [rows]) with logprob = log_softmax(z / T)[token],
    T = temperature (1 for greedy rows).
    """
    rows = logits.shape[0]
    temps = torch.tensor(
        [max(t, MIN_TEMPERATURE) if t > 0 else 1.0 for t in temperatures], dtype=logits.dtype
    )
    logprobs_all = torch.log_softmax(logits / temps[:, None], dim=-1)
    tokens = torch.empty(rows, dtype=torch.long)
    for i in range(rows):
        if temperatures[i] <= 0:
            tokens[i] = int(logprobs_all[i].argmax())
            continue
        probs = logprobs_all[i].exp()
        if top_ps[i] < 1.0:
            probs = _top_p_filter(probs, top_ps[i])
        tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    logprobs = logprobs_all.gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose mass reaches top_p (always at least the top one, whatever top_p:
    in float32 a top_p of 5e-324 is 0, and 0 >= 0 would drop them all)."""
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    drop = mass_before >= top_p
    drop[0] = False
    sorted_probs[drop] = 0.0
    filtered = torch.zeros_like(probs)
    filtered[order] = sorted_probs
    return filtered


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed)
    return g
