"""Data parallelism (learner/distributed.py): two learner processes make the update one process makes.

Two ranks over gloo (a file rendezvous, no port) each run `ppo_update` on the same 7 ragged answers with
minibatches of 3 (so the last minibatch of 1 leaves rank 1 nothing to compute) and a forward budget that
splits passes into micro-batches; once with the defaults' loss terms, once with the exact-KL term and the
pretraining mix too (their full-vocabulary distributions are gathered; the passages split between ranks).
Rank 0's weights and diagnostics must match one process's on the same batch: the gradients are the same
sums taken in another order, so they agree to float32 rounding (rtol 1e-4, atol 1e-5 on the weights).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import learner.update
from learner.config import LearnerSettings, PPOConfig
from learner.control import Refusal
from learner.distributed import SINGLE, DataParallel
from learner.policy import Batch, Policy
from learner.ptx import PTX_TEXT, PretrainingMix
from learner.trainer import Learner
from learner.update import LearnerState, ppo_update
from tests.support.learner import SMALL_BATCHES, make_event, make_events, make_prompts, tiny_base
from thumbtune.core.settings import Settings
from thumbtune.core.store import LocalAdapterStore

CPU = torch.device("cpu")
CONFIGS = {
    "default terms": dict(epochs=2, minibatch_size=3, early_stop_kl=None, lr=1e-3),
    "exact KL and ptx": dict(
        epochs=2, minibatch_size=3, early_stop_kl=None, lr=1e-3, kl_coef=0.05, ptx_coef=0.2, ptx_batch=3
    ),
}
UNCOMPARABLE = ("update_s", "tokens_per_s")
BUDGET = 40
"""CPU_FORWARD_TOKENS here: a few rows per pass, so every rank splits its share into micro-batches."""

pytestmark = pytest.mark.usefixtures("single_thread", "own_rng")


def ragged_events(base, n: int = 7) -> list:
    g = torch.Generator().manual_seed(3)
    events = []
    for i, prompt in enumerate(make_prompts(n, 7, seed=5)):
        response = torch.randint(10, 2000, (3 + (5 * i) % 9,), generator=g).tolist()
        logprobs = (-3 * torch.rand(len(response), generator=g)).tolist()
        events.append(make_event(base, prompt[: 4 + i % 4], response, logprobs, 1.0 if i % 3 else -1.0))
    return events


def update(model_dir: Path, cache: Path, config: dict, dp: DataParallel) -> dict:
    """A fresh policy on the tiny base, one PPO update of the ragged batch; its weights and diagnostics."""
    base = tiny_base(model_dir, cache)
    policy = Policy.fresh(base.model, Settings(model=str(model_dir)), CPU)
    dp.broadcast_parameters(policy.parameters())
    start = [p.detach().clone() for p in policy.parameters()]
    cfg = PPOConfig(**config)
    state = LearnerState.create(policy, cfg, seed=0)
    ptx = PretrainingMix(base.tokenizer, PTX_TEXT) if cfg.ptx_coef > 0 else None
    batch = Batch.from_events(ragged_events(base), base.tokenizer.pad_token_id)
    diagnostics = ppo_update(policy, batch, state, cfg, ptx, dp)
    params = [p.detach().clone() for p in policy.parameters()]
    moved = max((p - p0).abs().max().item() for p, p0 in zip(params, start, strict=True))
    return {"params": params, "diagnostics": diagnostics, "moved": moved}


def _rank(rank: int, world: int, rendezvous: str, model_dir: Path, cache: Path, out: Path) -> None:
    torch.set_num_threads(1)
    learner.update.CPU_FORWARD_TOKENS = BUDGET
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        dp = DataParallel(rank, world)
        results = {name: update(model_dir, cache / f"rank{rank}", cfg, dp) for name, cfg in CONFIGS.items()}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("dp")
    out = tmp / "rank0.pt"
    ctx = mp.get_context("spawn")
    args = (2, f"file://{tmp / 'rendezvous'}", tiny_model_dir, tmp / "cache", out)
    ranks = [ctx.Process(target=_rank, args=(rank, *args)) for rank in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=300)
    codes = [p.exitcode for p in ranks]
    for p in ranks:
        if p.is_alive():
            p.kill()
    assert codes == [0, 0], f"rank exit codes {codes}"
    return torch.load(out)


@pytest.mark.parametrize("name", CONFIGS)
def test_two_ranks_make_the_single_process_update(
    name: str, two_ranks: dict, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(learner.update, "CPU_FORWARD_TOKENS", BUDGET)
    one = update(tiny_model_dir, tmp_path, CONFIGS[name], SINGLE)
    two = two_ranks[name]
    for key, value in one["diagnostics"].items():
        if key in UNCOMPARABLE or not math.isfinite(value):
            continue
        assert two["diagnostics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert one["moved"] > 1e-3  # the update moved the weights far more than the tolerance below
    for a, b in zip(one["params"], two["params"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_one_process_collectives_are_the_identity() -> None:
    index = torch.arange(5)
    assert SINGLE.rows(index) is index
    assert SINGLE.sum_floats({"a": 1.5}) == {"a": 1.5}
    assert SINGLE.broadcast({"kind": "stop"}) == {"kind": "stop"}
    assert [len(DataParallel(r, 2).rows(torch.arange(3))) for r in range(2)] == [2, 1]
    assert len(DataParallel(1, 2).rows(torch.arange(1))) == 0  # a rank may get no rows of a minibatch


def _follow_rank(rank: int, rendezvous: str, model_dir: Path, tmp: Path, out: Path) -> None:
    """Rank 0 trains v1, hears v1 refused, trains v2 from v0; rank 1 follows; both then compare weights."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    try:
        dp = DataParallel(rank, 2)
        learner_ = Learner(
            Settings(model=str(model_dir)),
            LearnerSettings(**SMALL_BATCHES),
            base=tiny_base(model_dir, tmp / f"cache{rank}"),
            store=LocalAdapterStore(tmp / "adapters"),
            dp=dp,
        )
        if dp.leader:
            events = make_events(model_dir, tmp / "events", 16, seed=4)
            learner_.train(events[:8])
            learner_.refusals.add(Refusal("v1", "admin", "refused in a test"))
            learner_.train(events[8:])  # steps off v1 to v0 first: rank 1 must restore v0 too
            learner_.stop_followers()
        else:
            learner_.follow()
        flat = torch.cat([p.detach().reshape(-1) for p in learner_.policy.parameters()])
        box = [(learner_.version, flat) if rank == 1 else None]
        dist.broadcast_object_list(box, src=1)  # rank 1's version and weights, to rank 0
        if dp.leader:
            version, theirs = box[0]
            parents = [learner_.store.read_manifest(v).parent for v in learner_.store.versions()]
            result = {"gap": (flat - theirs).abs().max().item(), "parents": parents, "follower": version}
            torch.save(result | {"leader": learner_.version}, out)
    finally:
        dist.destroy_process_group()


def test_a_follower_restores_the_version_rank_0_steps_back_to_and_ends_with_its_weights(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "follow.pt"
    ctx = mp.get_context("spawn")
    args = (f"file://{tmp_path / 'rendezvous'}", tiny_model_dir, tmp_path, out)
    ranks = [ctx.Process(target=_follow_rank, args=(rank, *args)) for rank in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=300)
    assert [p.exitcode for p in ranks] == [0, 0]
    result = torch.load(out)
    assert result["parents"] == ["v0", "v0"]  # v2 was trained from v0: rank 0 stepped off the refused v1
    assert result["follower"] == result["leader"] == "v2"
    assert result["gap"] < 1e-5  # the same weights on both ranks after restoring and training alike
