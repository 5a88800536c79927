"""KL(p || q) between two policies: the exact divergence and its sample estimators.

The learner penalises its reward with k1 (or k3) at the sampled token and may add the exact KL to its loss;
the server's KL probe refuses versions by the exact KL on fixed prompts; the benchmarks report both. They
all compute it here.

    exact  KL(p || q) = sum_v p(v) (log p(v) - log q(v))     at one state, over the whole vocabulary

and from a token x ~ p with r = log q(x) - log p(x) (http://joschu.net/blog/kl-approx.html):

    k1 = -r                    unbiased, high variance, can be negative
    k2 = r^2 / 2               biased, low variance, >= 0
    k3 = (e^r - 1) - r         unbiased, low variance, >= 0
"""

from __future__ import annotations

import torch
from torch import Tensor


def exact_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) at each position, summed over the whole vocabulary: sum_v p_v (log p_v - log q_v), [...].

    ``log_p`` and ``log_q`` are log-distributions [..., V]. Unlike k1-k3 this is no estimate from the
    sampled token: at a visited state it is the divergence itself, and its gradient pulls every token's
    probability back toward q, not only the one that was sampled.
    """
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kl_k1(logp: Tensor, logq: Tensor) -> Tensor:
    """k1 = -r = log p(x) - log q(x): unbiased for KL(p || q), high variance, can be negative."""
    return logp - logq


def kl_k2(logp: Tensor, logq: Tensor) -> Tensor:
    """k2 = r^2 / 2: biased for KL(p || q), low variance, >= 0."""
    return 0.5 * (logq - logp) ** 2


def kl_k3(logp: Tensor, logq: Tensor) -> Tensor:
    """k3 = (e^r - 1) - r: unbiased for KL(p || q), low variance, >= 0."""
    log_ratio = logq - logp
    return torch.expm1(log_ratio) - log_ratio
