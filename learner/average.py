"""Polyak averaging of the LoRA weights: what the learner publishes when THUMBTUNE_LEARNER_AVERAGE_DECAY > 0.

    w_k = d * w_{k-1} + (1 - d) * theta_k          (w_0 = theta_0; d = 0 publishes theta itself)

theta is what PPO trains; w is what version k's adapter_model.safetensors holds, so what the servers
answer with. One update moves theta by a step fitted to one batch of noisy thumbs; w moves by (1 - d) of
that step, so the noise of consecutive updates averages out (Polyak & Juditsky 1992) while a direction
that many updates agree on carries through, d / (1 - d) versions late. The served answers then come from
w, not from theta: the truncated importance weights min(1, pi_theta / pi_b) of learner/ppo.py correct for
that gap as they do for staleness. theta itself is kept in learner_state.pt, so a resumed learner trains
on from theta, not from the average.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable (LoRA) parameters of a peft model by name: what is averaged and published."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class WeightAverage:
    """The exponential moving average w of the parameters ``params`` (held by reference)."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"average decay must be in [0, 1), got {decay}")
        self.params = params
        self.decay = decay
        self.shadow = {name: p.detach().clone() for name, p in params.items()}
        self._swapped = False

    @torch.no_grad()
    def update(self) -> float:
        """w <- d * w + (1 - d) * theta after an update; returns ||theta - w|| / ||w||, how far the trained
        weights are ahead of the published ones."""
        if self._swapped:
            raise RuntimeError("update() inside published(): the parameters hold w, not theta")
        gap = norm = 0.0
        for name, p in self.params.items():
            w = self.shadow[name]
            w.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)
            gap += float((p.detach() - w).pow(2).sum())
            norm += float(w.pow(2).sum())
        return (gap / norm) ** 0.5 if norm > 0 else 0.0

    @contextmanager
    def published(self) -> Iterator[None]:
        """Within the block the parameters hold w (to save or sample with); theta comes back after it."""
        if self._swapped:
            raise RuntimeError("published() does not nest")
        trained = {name: p.detach().clone() for name, p in self.params.items()}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.shadow[name])
        self._swapped = True
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(trained[name])
            self._swapped = False


def trained_weights(params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """A CPU copy of theta, for learner_state.pt."""
    return {name: p.detach().cpu().clone() for name, p in params.items()}


@torch.no_grad()
def load_trained_weights(params: dict[str, nn.Parameter], saved: dict[str, Tensor]) -> None:
    """Put a saved theta back into the parameters; the names and shapes must match exactly."""
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise RuntimeError(
            f"saved trained weights do not fit the adapter: missing {missing[:3]}, extra {extra[:3]}"
        )
    for name, p in params.items():
        if saved[name].shape != p.shape:
            shape = tuple(saved[name].shape)
            raise RuntimeError(f"saved trained weight {name} is {shape}, the adapter's {tuple(p.shape)}")
        p.copy_(saved[name].to(p.device, p.dtype))
