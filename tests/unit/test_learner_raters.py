"""Rater influence limits (learner/raters.py): the water-filling cap by hand, both scopes, per-rater
normalisation, and on the tiny model that a heavy rater with the opposite taste steers an update without the
cap and does not with it."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from learner.policy import Batch
from learner.raters import ANONYMOUS, RaterWindow, capped_amounts, limit, rater_of, top_share
from learner.reward_model import RewardModel
from tests.support.learner import make_event, make_prompts, sample_events, tiny_base, tiny_learner
from thumbtune.core.contract import FeedbackEvent

pytestmark = pytest.mark.usefixtures("single_thread")


def test_a_rater_over_the_cap_is_held_to_the_level_that_makes_its_share_the_cap() -> None:
    amounts = {"a": 16, "b": 4, "c": 4, "d": 4, "e": 4}
    # cap 0.2: L = 0.2 * (4 * 4) / (1 - 0.2) = 4, so a keeps 4 of 16 and its share is 4 / 20
    assert capped_amounts(amounts, 0.2) == {"a": 4, "b": 4, "c": 4, "d": 4, "e": 4}
    # cap 0.25: L = 0.25 * 16 / 0.75 = 16 / 3, a's share (16/3) / (16 + 16/3) = 0.25
    kept = capped_amounts(amounts, 0.25)
    assert kept["a"] == pytest.approx(16 / 3) and top_share(kept) == pytest.approx(0.25)
    # two raters over the level: L = 0.3 * (6 + 4) / (1 - 2 * 0.3) = 7.5 holds both, 6 and 4 stay
    kept = capped_amounts({"a": 20, "b": 10, "c": 6, "d": 4}, 0.3)
    assert kept == pytest.approx({"a": 7.5, "b": 7.5, "c": 6, "d": 4}) and top_share(kept) == pytest.approx(
        0.3
    )


def test_nobody_is_capped_under_the_cap_or_with_the_cap_off() -> None:
    assert capped_amounts({"a": 5, "b": 5, "c": 4}, 0.4) == {"a": 5, "b": 5, "c": 4}
    assert capped_amounts({"a": 100, "b": 1}, 1.0) == {"a": 100, "b": 1}
    assert capped_amounts({"a": 100}, 0.1) == {"a": 100}  # one rater: its share is 1 whatever the cap
    assert capped_amounts({}, 0.2) == {}


def test_a_cap_below_one_over_k_gives_every_rater_an_equal_share() -> None:
    assert capped_amounts({"a": 10, "b": 2}, 0.1) == {"a": 2, "b": 2}
    assert capped_amounts({"a": 10, "b": 5, "c": 1}, 0.2) == pytest.approx({"a": 1, "b": 1, "c": 1})


def test_capped_shares_never_exceed_the_cap_and_under_the_level_nothing_changes() -> None:
    rng = random.Random(3)
    for _ in range(500):
        k = rng.randint(1, 8)
        amounts = {str(i): rng.choice([rng.uniform(0.1, 50), float(rng.randint(1, 40))]) for i in range(k)}
        cap = rng.uniform(0.05, 1.0)
        kept = capped_amounts(amounts, cap)
        assert top_share(kept) <= max(cap, 1 / k) + 1e-9
        level = max(kept.values())
        for r, n in amounts.items():
            assert kept[r] == pytest.approx(min(n, level))


def event(rater: str | None, reward: float = 1.0, user: str | None = None) -> FeedbackEvent:
    return FeedbackEvent.model_validate(
        {
            "event_id": f"e{random.random()}",
            "response_id": "r",
            "completion_id": "c",
            "api_key_id": rater,
            "user": user,
            "answered_at": 1.0,
            "rated_at": 2.0,
            "base_model": "m",
            "base_fingerprint": "f",
            "adapter_version": "v0",
            "messages": [{"role": "user", "content": "hi"}],
            "prompt_token_ids": [1],
            "response_token_ids": [2],
            "behaviour_logprobs": [-1.0],
            "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 4},
            "finish_reason": "stop",
            "kind": "thumb",
            "value": "up" if reward > 0 else "down",
            "reward": reward,
        }
    )


def test_the_rater_is_the_key_unless_the_user_field_is_trusted() -> None:
    e = event("k1", user="alice")
    assert rater_of(e) == "key:k1" and rater_of(e, "user") == "user:alice"
    assert rater_of(event("k1"), "user") == "key:k1"  # no user sent: the key
    assert rater_of(event(None)) == ANONYMOUS
    # the user field travels in the JSON only when set, so older learners still read the rest
    assert b'"user":' not in event("k1").to_bytes() and b'"user":"alice"' in e.to_bytes()
    assert FeedbackEvent.from_bytes(e.to_bytes()).user == "alice"


def test_an_update_weighs_each_rating_by_its_raters_capped_share() -> None:
    batch = [event("attacker") for _ in range(16)] + [event(f"honest{i}") for i in range(4) for _ in range(4)]
    limited = limit(batch, RaterWindow(512), cap=0.2)
    assert limited.weights == [0.25] * 16 + [1.0] * 16
    d = limited.diagnostics
    assert d["raters.top_share"] == 0.5 and d["raters.top_share_capped"] == pytest.approx(0.2)
    assert d["raters.update"] == 5 and d["raters.capped"] == 1 and d["raters.weight_removed"] == 12
    assert limited.rewards == [e.reward for e in batch]  # not normalised unless asked
    assert limit(batch, RaterWindow(512), cap=1.0).weights == [1.0] * 32


def test_a_rater_under_the_cap_in_one_update_is_still_capped_over_the_window() -> None:
    window = RaterWindow(64)
    # 48 of the window's ratings so far are one key's
    limit([event("heavy") for _ in range(48)] + [event(f"h{i}") for i in range(4)], window, cap=0.5)
    # this update alone: heavy has 4 of 12 (a third, under 0.5); the window: 52 of 64 (81%)
    limited = limit(
        [event("heavy") for _ in range(4)] + [event(f"h{i}") for i in range(4, 12)], window, cap=0.5
    )
    counts = window.counts()
    assert len(window) == 64 and counts["key:heavy"] == 52
    # window level: L = 0.5 * 12 / 0.5 = 12, g = 12 / 52; then 4 * 12 / 52 = 0.92 is under the update's level
    assert limited.weights[:4] == pytest.approx([12 / 52] * 4) and limited.weights[4:] == [1.0] * 8
    assert limited.diagnostics["raters.window_top_share"] == pytest.approx(52 / 64)
    assert limited.diagnostics["raters.window_top_share_capped"] == pytest.approx(0.5)


def test_per_rater_normalisation_mutes_a_rater_who_approves_everything() -> None:
    window = RaterWindow(512)
    honest = [event(f"h{i % 4}", 1.0 if (i // 4) % 2 else -1.0) for i in range(32)]  # each half up
    limit(honest + [event("yes-man", 1.0) for _ in range(32)], window, cap=1.0)
    limited = limit(
        [event("yes-man", 1.0), event("h0", 1.0), event("h0", -1.0)], window, cap=1.0, normalise=True
    )
    yes_man, up, down = limited.rewards
    # by hand: yes-man's 33 ups shrunk toward the window's moments with k = 8 pseudo-ratings
    n_all, mean_all, var_all = window.moments()
    m = (33 * 1.0 + 8 * mean_all) / 41
    s = math.sqrt(max((33 * 0.0 + 8 * var_all) / 41, 0.01))
    assert yes_man == pytest.approx((1.0 - m) / s)
    assert abs(yes_man) < 0.5 * abs(up) and up > 0 > down  # a yes-man's up says far less than an honest one
    window_again = RaterWindow(512)
    window_again.load_state_dict(window.state_dict())
    assert window_again.state_dict() == window.state_dict()  # it is learner state: it survives a restart


def test_the_reward_model_learns_nothing_from_a_rating_at_weight_zero(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    base = tiny_base(tiny_model_dir, tmp_path)
    events = [make_event(base, [1, 2], [3], [-1.0], 1.0 if i % 2 else -1.0) for i in range(8)]
    model = RewardModel(heads=3, dim=4)
    model.observe(events, torch.randn(8, 4), torch.tensor([1.0, 0.0] * 4))
    assert torch.equal(model.bootstrap[:, 1::2], torch.zeros(3, 4)) and model.bootstrap[:, ::2].sum() > 0


def odd_minus_even(learner, events: list[FeedbackEvent]) -> float:  # noqa: ANN001
    """Mean log pi of the answers whose first token is odd minus that of the even ones."""
    batch = Batch.from_events(events, learner.pad_id)
    with torch.no_grad():
        logp = learner.policy.forward_batch(batch, with_values=False).logprobs.sum(1)
    odd = torch.tensor([e.response_token_ids[0] % 2 == 1 for e in events])
    return float(logp[odd].mean() - logp[~odd].mean())


@pytest.mark.parametrize("cap", [1.0, 0.2])
def test_a_heavy_rater_of_the_opposite_taste_steers_an_update_only_without_the_cap(
    tiny_model_dir: Path, tmp_path: Path, cap: float
) -> None:
    """4 honest keys like answers starting with an odd token; one key sending 3/4 of the batch likes the
    opposite. Without the cap (1.0) the update follows the attacker; at 0.2 it follows the honest keys."""
    learner = tiny_learner(tiny_model_dir, tmp_path, batch_size=64, minibatch_size=16, lr=5e-3, rater_cap=cap)
    generator = torch.Generator().manual_seed(5)

    def likes_odd(r: list[int]) -> float:
        return 1.0 if r[0] % 2 else -1.0

    honest = sample_events(learner.policy, learner.base, make_prompts(4, 4, 1), 4, 5, likes_odd, generator)
    attacker = sample_events(
        learner.policy, learner.base, make_prompts(12, 4, 2), 4, 5, lambda r: -likes_odd(r), generator
    )
    honest = [e.model_copy(update={"api_key_id": f"honest{i % 4}"}) for i, e in enumerate(honest)]
    attacker = [e.model_copy(update={"api_key_id": "attacker"}) for e in attacker]
    before = odd_minus_even(learner, honest + attacker)
    manifest = learner.store.read_manifest(learner.train(honest + attacker))
    moved = odd_minus_even(learner, honest + attacker) - before
    d = manifest.diagnostics
    assert d["raters.top_share"] == 0.75
    if cap < 1:
        assert d["raters.top_share_capped"] == pytest.approx(0.2) and moved > 0
    else:
        assert d["raters.top_share_capped"] == 0.75 and moved < 0
