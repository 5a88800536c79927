"""The pretraining mix: InstructGPT's PPO-ptx term, so that what the policy learns from ratings does not cost
what the base could already do. InstructGPT (Ouyang et al. 2022, eq. 2) maximises

    objective(phi) = E_(x,y)~pi_phi [ r(x, y) - beta log(pi_phi(y | x) / pi_ref(y | x)) ]
                     + gamma E_x~D_pretrain [ log pi_phi(x) ]

The first line is PPO (learner/update.py); this module is the second. Every minibatch adds

    L_ptx = -gamma * mean_t log pi_theta(x_t | x_<t)      over ``ptx_batch`` passages drawn from D_ptx

with gamma = ``ptx_coef``. D_ptx is plain text the base already models well: learner/data/ptx.txt, short
general-knowledge passages (blank-line separated), written for this and never used by any benchmark's
probe. Point THUMBTUNE_LEARNER_PTX_TEXT at a file of your own (the same format) to use another corpus.
A passage is a `Sample` whose "prompt" is its first token, so `Policy.forward_batch` gives the log-prob of
every later token; its reward and behaviour log-probs are unused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from learner.policy import Batch, Sample

PTX_TEXT = Path(__file__).parent / "data" / "ptx.txt"
MAX_TOKENS = 96
"""Tokens kept of each passage (enough for 2-3 sentences)."""


def load_passages(path: Path) -> list[str]:
    """The file's blank-line separated passages; a clear error for a missing or empty file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read the pretraining-mix text {path}: {exc.strerror}") from exc
    passages = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    if not passages:
        raise ValueError(f"the pretraining-mix text {path} holds no passage (blank-line separated)")
    return passages


class PretrainingMix:
    """The passages as token ids, and minibatches of them."""

    def __init__(self, tokenizer, path: Path = PTX_TEXT, max_tokens: int = MAX_TOKENS) -> None:  # noqa: ANN001 - any HF tokenizer
        self.pad_id: int = tokenizer.pad_token_id
        self.passages = [
            ids[:max_tokens]
            for ids in (tokenizer(p, add_special_tokens=True)["input_ids"] for p in load_passages(path))
            if len(ids) >= 2
        ]
        if not self.passages:
            raise ValueError(f"no passage of {path} is two tokens or longer")

    def batch(self, k: int, generator: torch.Generator) -> Batch:
        """``k`` passages drawn uniformly (with replacement) as a `Batch`."""
        index = torch.randint(len(self.passages), (k,), generator=generator).tolist()
        samples = [
            Sample(
                f"ptx-{i}",
                self.passages[i][:1],
                self.passages[i][1:],
                [0.0] * (len(self.passages[i]) - 1),
                1.0,
                0.0,
            )
            for i in index
        ]
        return Batch.from_samples(samples, self.pad_id)
