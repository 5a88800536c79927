"""learner/update.py's CPU memory bound (CPU_FORWARD_TOKENS) changes how passes are split, not the update."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import learner.update
from learner.config import PPOConfig
from learner.policy import Batch, Policy
from learner.update import LearnerState, ppo_update, row_chunks
from tests.support.learner import make_event, make_prompts, tiny_base
from thumbtune.core.settings import Settings

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("single_thread", "own_rng")


def ragged_events(base, n: int = 8) -> list:
    """``n`` events with prompts and answers of different lengths, so chunks pad differently."""
    g = torch.Generator().manual_seed(3)
    prompts = make_prompts(n, 7, seed=5)
    events = []
    for i, prompt in enumerate(prompts):
        response = torch.randint(10, 2000, (3 + (5 * i) % 9,), generator=g).tolist()
        logprobs = (-3 * torch.rand(len(response), generator=g)).tolist()
        events.append(make_event(base, prompt[: 4 + i % 4], response, logprobs, 1.0 if i % 3 else -1.0))
    return events


def update_with_budget(tiny_model_dir: Path, tmp_path: Path, budget: int | None, monkeypatch) -> dict:
    base = tiny_base(tiny_model_dir, tmp_path)  # a fresh base each time: Policy.fresh wraps it in place
    policy = Policy.fresh(base.model, Settings(model=str(tiny_model_dir)), CPU)
    cfg = PPOConfig(epochs=2, minibatch_size=4, early_stop_kl=None, lr=1e-3)
    state = LearnerState.create(policy, cfg, seed=0)
    monkeypatch.setattr(learner.update, "CPU_FORWARD_TOKENS", budget)
    batch = Batch.from_events(ragged_events(base), base.tokenizer.pad_token_id)
    diagnostics = ppo_update(policy, batch, state, cfg)
    return diagnostics | {"params": [p.detach().clone() for p in policy.parameters()]}


def test_micro_batches_and_chunked_passes_give_the_same_update(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = update_with_budget(tiny_model_dir, tmp_path, None, monkeypatch)
    split = update_with_budget(tiny_model_dir, tmp_path, 1, monkeypatch)  # every row its own pass
    for name, value in whole.items():
        if name in ("params", "update_s", "tokens_per_s") or not math.isfinite(value):
            continue
        assert split[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert whole["grad_norm"] > 0  # the norm of the summed gradient: an unweighted sum would inflate it
    for a, b in zip(whole["params"], split["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_row_chunks_keep_every_row_once_within_the_budget() -> None:
    lengths = [5, 9, 3, 7, 9, 2]
    mask = torch.zeros(len(lengths), 9, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    batch = Batch(
        mask,
        mask,
        torch.ones(6, dtype=torch.long),
        mask,
        mask.float(),
        torch.zeros(6),
        torch.zeros(6, 9),
        torch.ones(6),
        [str(i) for i in range(6)],
    )
    index = torch.tensor([4, 0, 5, 2, 1, 3])
    assert [c.tolist() for c in row_chunks(batch, index, None)] == [index.tolist()]
    chunks = row_chunks(batch, index, 20)  # width 9: 54 padded tokens -> 3 chunks of 2 rows
    assert [c.tolist() for c in chunks] == [[4, 0], [5, 2], [1, 3]]
    assert [c.tolist() for c in row_chunks(batch, index, 1)] == [[i] for i in index.tolist()]
