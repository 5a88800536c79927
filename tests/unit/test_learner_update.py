"""The learner on the tiny model: learns, stays near the reference, weights stale answers, saves adapters."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from learner.checkpoint import load_latest, save_version
from learner.config import LearnerSettings
from learner.events import stale_reason
from learner.policy import Batch, Policy, resolve_precision
from learner.ppo import masked_mean
from learner.trainer import Learner
from learner.update import LearnerState, importance_weights, ppo_update
from tests.support.learner import make_event, make_prompts, sample_events, tiny_base
from thumbtune.core.contract import ControlAck
from thumbtune.core.settings import Settings
from thumbtune.core.store import LocalAdapterStore

CPU = torch.device("cpu")
SHARPEN = 10.0  # see tiny_base: at x10 a few tokens recur in ~20-50% of a prompt's answers


pytestmark = pytest.mark.usefixtures("single_thread")


def fresh_policy(tiny_model_dir: Path, tmp_path: Path, autocast_dtype: torch.dtype | None = None):
    base = tiny_base(tiny_model_dir, tmp_path, sharpen=SHARPEN)
    return base, Policy.fresh(
        base.model, Settings(model=str(tiny_model_dir)), CPU, autocast_dtype=autocast_dtype
    )


def response_positions(batch: Batch) -> torch.Tensor:
    """[B, L] mask of the positions whose logits predict response tokens."""
    mask = torch.zeros(batch.input_ids.shape)
    lengths = batch.mask.sum(1).long().tolist()
    for i, (p, n) in enumerate(zip(batch.prompt_lens.tolist(), lengths, strict=True)):
        mask[i, p - 1 : p - 1 + n] = 1
    return mask


@torch.no_grad()
def full_logprobs(model, batch: Batch) -> torch.Tensor:
    """log_softmax over the vocabulary at every position, from an ordinary full forward pass."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits.float().log_softmax(-1)


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, None)],
    ids=["amx", "avx512-bf16", "neither"],
)
def test_precision_auto_picks_bfloat16_only_where_it_is_fast_and_refuses_unknown_names(
    monkeypatch: pytest.MonkeyPatch, amx: bool, avx512_bf16: bool, expected: torch.dtype | None
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert resolve_precision("auto", CPU) is expected
    assert resolve_precision("float32", torch.device("cuda")) is None
    assert resolve_precision("bfloat16", CPU) is torch.bfloat16
    assert resolve_precision("auto", torch.device("cuda")) is torch.bfloat16
    with pytest.raises(ValueError, match="precision must be"):
        resolve_precision("fp8", CPU)


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["float32", "bfloat16"])
def test_ppo_raises_the_rewarded_tokens_probability_while_kl_to_the_reference_stays_bounded(
    tiny_model_dir: Path, tmp_path: Path, autocast_dtype: torch.dtype | None
) -> None:
    base, policy = fresh_policy(tiny_model_dir, tmp_path, autocast_dtype)
    cfg = LearnerSettings(lr=1e-3)  # the product's defaults otherwise: adaptive beta, early stop
    state = LearnerState.create(policy, cfg)
    generator = torch.Generator().manual_seed(0)
    prompts = make_prompts(2, 6, seed=1)

    first = sample_events(policy, base, prompts, 16, 8, lambda r: 0.0, generator)
    counts = collections.Counter(t for e in first for t in set(e.response_token_ids))
    chosen, seen_in = counts.most_common(1)[0]
    assert 0.1 <= seen_in / len(first) <= 0.7, "the tiny model changed: pick prompts where a token recurs"
    probe = Batch.from_events(first, base.tokenizer.pad_token_id)
    probe = dataclasses.replace(probe, response_ids=torch.full_like(probe.response_ids, chosen))

    def chosen_probability(reference: bool = False) -> float:
        with torch.no_grad():
            logprobs = policy.forward_batch(probe, with_values=False, reference=reference).logprobs
        return masked_mean(logprobs.exp(), probe.mask).item()

    before = chosen_probability()
    assert before == pytest.approx(chosen_probability(reference=True), abs=1e-6)  # v0 is the base

    def reward(response: list[int]) -> float:
        return 1.0 if chosen in response else -1.0

    for step in range(4):
        events = sample_events(policy, base, prompts, 16, 8, reward, generator)
        diagnostics = ppo_update(policy, Batch.from_events(events, base.tokenizer.pad_token_id), state, cfg)
        policy.version = f"v{step + 1}"
        # every batch was sampled by the policy itself (in float32: bf16 autocast's rounding shows slightly)
        assert diagnostics["is_ess"] == pytest.approx(1.0, abs=1e-6 if autocast_dtype is None else 1e-3)
    after = chosen_probability()

    assert after > 1.4 * before, f"p(chosen) went {before:.4f} -> {after:.4f}"
    with torch.no_grad(), policy.model.disable_adapter():
        ref_logprobs = full_logprobs(policy.model, probe)
    logprobs = full_logprobs(policy.model, probe)
    kl_per_token = (logprobs.exp() * (logprobs - ref_logprobs)).sum(-1)  # exact KL(pi || pi_ref) per position
    positions = response_positions(probe)
    assert 0 < (kl_per_token * positions).sum() / positions.sum() < 0.5
    assert state.updates == 4 and diagnostics["beta"] > 0
    expected = {
        "policy_loss",
        "value_loss",
        "entropy",
        "approx_kl",
        "kl_ref",
        "beta",
        "clipfrac",
        "n_events",
        "explained_variance",
        "mean_reward",
        "is_ess",
        "response_length_drift",
        "update_s",
    }
    assert expected <= set(diagnostics)


def test_the_exact_kl_term_keeps_the_policy_closer_to_the_reference(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Same events, same seed: with kl_coef > 0 the updates end nearer pi_ref than with the penalty alone."""
    generator = torch.Generator().manual_seed(0)
    prompts = make_prompts(2, 6, seed=1)
    base, sampler = fresh_policy(tiny_model_dir, tmp_path / "sampler")
    events = sample_events(sampler, base, prompts, 16, 8, lambda r: 0.0, generator)
    counts = collections.Counter(t for e in events for t in set(e.response_token_ids))
    chosen = counts.most_common(1)[0][0]
    events = [
        e.model_copy(update={"reward": 1.0 if chosen in e.response_token_ids else -1.0}) for e in events
    ]

    def kl_after(kl_coef: float) -> tuple[float, dict[str, float]]:
        base, policy = fresh_policy(tiny_model_dir, tmp_path / f"kl{kl_coef}")
        cfg = LearnerSettings(lr=5e-3, early_stop_kl=None, kl_coef=kl_coef)
        state = LearnerState.create(policy, cfg)
        batch = Batch.from_events(events, base.tokenizer.pad_token_id)
        for _ in range(3):
            diagnostics = ppo_update(policy, batch, state, cfg)
        logprobs = full_logprobs(policy.model, batch)
        with torch.no_grad(), policy.model.disable_adapter():
            ref_logprobs = full_logprobs(policy.model, batch)
        kl = (logprobs.exp() * (logprobs - ref_logprobs)).sum(-1)
        positions = response_positions(batch)
        return ((kl * positions).sum() / positions.sum()).item(), diagnostics

    free, free_diagnostics = kl_after(0.0)
    leashed, diagnostics = kl_after(5.0)
    assert "kl_loss" not in free_diagnostics and diagnostics["kl_loss"] > 0
    assert free > 0.01, "the updates did not move the policy: nothing to compare"
    assert leashed < 0.7 * free, f"KL to the reference: {free:.4f} without the term, {leashed:.4f} with it"


def test_importance_weights_are_one_on_policy_and_shrink_where_the_policy_moved_away(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    base, policy = fresh_policy(tiny_model_dir, tmp_path)
    generator = torch.Generator().manual_seed(1)
    prompts = make_prompts(2, 5, seed=1)
    events = sample_events(
        policy, base, prompts[:1], 8, 6, lambda r: 1.0, generator, temperature=1.0
    ) + sample_events(policy, base, prompts[1:], 8, 6, lambda r: -1.0, generator, temperature=0.7)
    batch = Batch.from_events(events, base.tokenizer.pad_token_id)

    on_policy = importance_weights(policy, batch, c=1.0)
    torch.testing.assert_close(on_policy, batch.mask, atol=1e-4, rtol=0)  # both temperatures: w = 1

    cfg = LearnerSettings(lr=5e-3, early_stop_kl=None)
    state = LearnerState.create(policy, cfg)
    ppo_update(policy, batch, state, cfg)  # the policy moves; the events stay those v0 served

    weights = importance_weights(policy, batch, c=1.0)
    with torch.no_grad():
        now = policy.forward_batch(batch, with_values=False, tempered=True).tempered_logprobs
    fell = (now < batch.behaviour_logprobs - 1e-3) & batch.mask.bool()
    rose = (now > batch.behaviour_logprobs + 1e-3) & batch.mask.bool()
    assert fell.any() and rose.any()
    torch.testing.assert_close(weights[fell], (now - batch.behaviour_logprobs).exp()[fell])
    assert (weights[fell] < 1).all() and (weights[rose] == 1).all()
    assert masked_mean(weights, batch.mask) < 1


def test_a_saved_version_loads_with_peft_and_reproduces_the_learners_logprobs(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    base, policy = fresh_policy(tiny_model_dir, tmp_path)
    settings = Settings(model=str(tiny_model_dir))
    # compared with float32 below; no averaging: the stored adapter is then the trained weights themselves
    learner_settings = LearnerSettings(lr=5e-3, seed=3, precision="float32", average_decay=0.0)
    cfg = learner_settings
    state = LearnerState.create(policy, cfg)
    generator = torch.Generator().manual_seed(2)
    events = sample_events(
        policy, base, make_prompts(2, 5, seed=2), 6, 6, lambda r: float(r[0] % 2) * 2 - 1, generator
    )
    batch = Batch.from_events(events, base.tokenizer.pad_token_id)
    diagnostics = ppo_update(policy, batch, state, cfg)
    store = LocalAdapterStore(tmp_path / "adapters")

    version = save_version(
        store,
        policy,
        state,
        base=base,
        event_ids=batch.event_ids,
        offsets={"thumbtune.feedback:0": 12},
        diagnostics=diagnostics,
    )

    assert version == "v1" and policy.version == "v1" and store.verify("v1") == []
    manifest = store.read_manifest("v1")
    assert (manifest.parent, manifest.event_count, manifest.event_ids) == ("v0", len(events), batch.event_ids)
    assert manifest.base_fingerprint == base.fingerprint and manifest.offsets == {"thumbtune.feedback:0": 12}
    assert math.isclose(manifest.diagnostics["kl_ref"], diagnostics["kl_ref"])
    assert set(manifest.sha256) == {
        "adapter_model.safetensors",
        "adapter_config.json",
        "value_head.safetensors",
        "learner_state.pt",
    }
    assert json.loads((store.path("v1") / "adapter_config.json").read_text())["r"] == settings.lora_r

    with torch.no_grad():
        learner = policy.forward_batch(batch, with_values=True)
        reference = policy.forward_batch(batch, with_values=False, reference=True)
    assert (learner.logprobs - reference.logprobs).abs().max() > 1e-3  # the adapter is not empty
    fresh_base = tiny_base(tiny_model_dir, tmp_path, SHARPEN).model
    served = PeftModel.from_pretrained(fresh_base, str(store.path("v1")))
    full = full_logprobs(served, batch)
    positions = response_positions(batch).bool()
    reloaded = full[positions].gather(-1, batch.response_ids[batch.mask.bool()].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(reloaded, learner.logprobs[batch.mask.bool()], atol=1e-5, rtol=0)

    resumed, resumed_state = load_latest(
        store, tiny_base(tiny_model_dir, tmp_path, SHARPEN), settings, learner_settings
    )
    assert resumed.version == "v1"
    with torch.no_grad():
        again = resumed.forward_batch(batch, with_values=True)
    torch.testing.assert_close(again.logprobs, learner.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(again.values, learner.values, atol=1e-6, rtol=0)
    assert resumed_state.kl_controller.value == state.kl_controller.value
    assert resumed_state.reward_moments.state_dict() == state.reward_moments.state_dict()
    assert resumed_state.updates == 1
    saved_moments = state.optimizer.state_dict()["state"]
    for key, moments in resumed_state.optimizer.state_dict()["state"].items():
        torch.testing.assert_close(moments["exp_avg"], saved_moments[key]["exp_avg"])


@pytest.fixture
def learner(tiny_model_dir: Path, tmp_path: Path) -> Learner:
    base = tiny_base(tiny_model_dir, tmp_path)
    return Learner(
        Settings(model=str(tiny_model_dir)),
        LearnerSettings(),
        base=base,
        store=LocalAdapterStore(tmp_path / "adapters"),
    )


def _valid(learner: Learner) -> dict:
    event = make_event(learner.base, [1, 2, 3], [4, 5], [-1.0, -2.0], reward=1.0)
    return json.loads(event.model_dump_json())


MALFORMED = {
    "not_json": lambda e: "{this is not json",
    "schema": lambda e: {k: v for k, v in e.items() if k != "reward"},
    "logprob_count": lambda e: e | {"behaviour_logprobs": [-1.0]},
    "fingerprint": lambda e: e | {"base_fingerprint": "0" * 32},
    "token_out_of_vocab": lambda e: e | {"response_token_ids": [4, 10**6]},
    "empty_prompt": lambda e: e | {"prompt_token_ids": []},
    "empty_response": lambda e: e | {"response_token_ids": [], "behaviour_logprobs": []},
    "bad_logprob": lambda e: e | {"behaviour_logprobs": [-1.0, float("nan")]},
    "bad_adapter_version": lambda e: e | {"adapter_version": "latest"},
    "too_long": lambda e: e | {"prompt_token_ids": [1] * 1024},
}


@pytest.mark.parametrize("code", sorted(MALFORMED))
def test_malformed_events_are_skipped_and_counted_by_reason(learner: Learner, code: str) -> None:
    broken = MALFORMED[code](_valid(learner))
    raw = broken if isinstance(broken, str) else json.dumps(broken)
    assert learner.admit(raw, "test:1") is None
    assert learner.skips.total == {code: 1}


def test_a_repeated_event_id_is_admitted_once(learner: Learner) -> None:
    raw = json.dumps(_valid(learner))
    assert learner.admit(raw, "test:1") is not None
    assert learner.admit(raw, "test:2") is None
    assert learner.skips.total == {"duplicate": 1}


def test_staleness_counts_versions_and_base_is_v0(learner: Learner) -> None:
    event = make_event(learner.base, [1], [2], [-1.0], reward=1.0, adapter_version="v2")
    assert stale_reason(event, "v6", max_staleness=4) is None
    assert stale_reason(event, "v7", max_staleness=4).startswith("stale:")
    assert stale_reason(event, "v1", max_staleness=4).startswith("future_version:")
    assert stale_reason(event.model_copy(update={"adapter_version": "base"}), "v4", 4) is None
    assert stale_reason(event.model_copy(update={"adapter_version": "base"}), "v5", 4).startswith("stale:")
    served_by_base = event.model_copy(update={"adapter_version": "base"})
    assert learner.drop_stale([event, served_by_base]) == [served_by_base]  # the learner is at v0
    assert learner.skips.total == {"future_version": 1}


def test_ratings_of_a_live_version_are_never_stale_however_far_the_learner_is_ahead(learner: Learner) -> None:
    """Canaries may hold live many versions behind the learner; its answers are most of the ratings."""
    event = make_event(learner.base, [1], [2], [-1.0], reward=1.0, adapter_version="v2")
    served_by_base = event.model_copy(update={"adapter_version": "base"})
    assert stale_reason(event, "v40", 4, serving=frozenset({"v2"})) is None
    assert stale_reason(served_by_base, "v40", 4, serving=frozenset({"v0"})) is None  # base is v0
    assert stale_reason(event, "v40", 4, serving=frozenset({"v3"})).startswith("stale:")
    assert stale_reason(event, "v1", 4, serving=frozenset({"v2"})).startswith("future_version:")

    learner.newest = "v9"  # as if nine versions were written since
    ack = ControlAck(record_id=None, replica="r1", applied=True, live="v2", at=1.0)
    assert learner.drop_stale([event, served_by_base]) == []
    learner.serving.take(ack)
    assert learner.drop_stale([event, served_by_base]) == [event]
    assert not learner.is_stale(event, 1) and learner.is_stale(served_by_base, 1)
    learner.serving.take(ack.model_copy(update={"leaving": True}))  # the replica left: v2 serves nowhere
    assert learner.drop_stale([event]) == []
    assert learner.skips.total == {"stale": 4}
