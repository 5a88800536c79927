"""learner/reward_model.py against hand-computed numbers (the arithmetic is in the comments)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from learner.reward_model import (
    Ensemble,
    Pair,
    Rated,
    RewardModel,
    auc,
    pairs_of,
    pairwise_loss,
    pointwise_label,
    pointwise_loss,
    prequential,
)
from thumbtune.core.contract import FeedbackKind

LN3 = math.log(3)  # sigma(ln 3) = 3 / 4


def test_pointwise_loss_is_the_weighted_mean_bce() -> None:
    scores, labels = torch.tensor([0.0, LN3]), torch.tensor([1.0, 0.0])
    # BCE(sigma(0), 1) = -ln(1/2) = ln 2; BCE(sigma(ln 3), 0) = -ln(1 - 3/4) = ln 4
    assert pointwise_loss(scores, labels, torch.ones(2)).item() == pytest.approx(
        (math.log(2) + math.log(4)) / 2
    )
    assert pointwise_loss(scores, labels, torch.tensor([2.0, 0.0])).item() == pytest.approx(math.log(2))
    # a soft label y = 1/4 at r = ln 3: -(1/4 ln 3/4 + 3/4 ln 1/4)
    soft = pointwise_loss(torch.tensor([LN3]), torch.tensor([0.25]), torch.ones(1)).item()
    assert soft == pytest.approx(-(0.25 * math.log(0.75) + 0.75 * math.log(0.25)))


def test_pairwise_loss_is_bradley_terry() -> None:
    # -ln sigma(ln 3 - 0) = -ln 3/4; the other way round -ln sigma(-ln 3) = -ln 1/4
    assert pairwise_loss(torch.tensor([LN3]), torch.tensor([0.0]), torch.ones(1)).item() == pytest.approx(
        -math.log(0.75)
    )
    both = pairwise_loss(torch.tensor([LN3, 0.0]), torch.tensor([0.0, LN3]), torch.tensor([3.0, 1.0])).item()
    assert both == pytest.approx((3 * -math.log(0.75) + -math.log(0.25)) / 4)


def rated(rid: str, kind: str, value: object, **extra: object) -> Rated:
    return Rated(rid, FeedbackKind(kind), value, **extra)


def test_labels_of_thumbs_and_ratings_and_none_for_relative_feedback() -> None:
    assert (
        pointwise_label(rated("a", "thumb", "up")) == 1.0
        and pointwise_label(rated("a", "thumb", "down")) == 0
    )
    assert [pointwise_label(rated("a", "rating", q)) for q in (1, 2, 3, 4, 5)] == [0, 0.25, 0.5, 0.75, 1]
    assert pointwise_label(rated("a", "choice", "chosen", paired_response_id="b")) is None


def test_every_comparison_weighs_one_in_all_its_pairs() -> None:
    events = [
        rated("a", "choice", "chosen", paired_response_id="b"),  # a over b
        rated("b", "choice", "rejected", paired_response_id="a"),
        rated("c", "choice", "chosen"),  # c, the best of three
        rated("d", "choice", "rejected", paired_response_id="c"),
        rated("e", "choice", "rejected", paired_response_id="c"),
        *(rated(r, "ranking", k, ranking_id="R", ranking_size=3) for r, k in (("g", 3), ("f", 1), ("h", 2))),
        rated("x", "ranking", 1, ranking_id="S", ranking_size=2),  # its other half has not arrived
        rated("t", "thumb", "up"),
    ]
    pairs = pairs_of(events)
    assert set(pairs) == {
        Pair("a", "b", 1.0),
        Pair("c", "d", 0.5),
        Pair("c", "e", 0.5),
        Pair("f", "h", 1 / 3),
        Pair("f", "g", 1 / 3),
        Pair("h", "g", 1 / 3),
    }
    assert len(pairs) == 6
    assert pairs_of([rated("b", "choice", "rejected", paired_response_id="gone")]) == []


def test_auc_counts_ties_as_half() -> None:
    # positives {0.9, 0.5} vs negatives {0.1, 0.5}: 0.9>0.1, 0.9>0.5, 0.5>0.1, 0.5=0.5 -> 3.5 / 4
    assert auc(torch.tensor([0.9, 0.1, 0.5, 0.5]), torch.tensor([1.0, 0.0, 1.0, 0.0])) == 0.875
    assert math.isnan(auc(torch.tensor([0.3]), torch.tensor([1.0])))


def test_prequential_figures_on_hand_made_scores() -> None:
    scores = torch.tensor([LN3, -LN3, 0.0, 1.0])
    labels = torch.tensor([1.0, 1.0, 0.5, 0.0])
    point = torch.tensor([True, True, True, False])
    out = prequential(scores, labels, point, torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0]))
    assert out["n"] == 3 and out["pairs"] == 3
    assert out["accuracy"] == 0.5  # of the two decided labels (y = 1/2 left out), one has the right sign
    # BCE: -ln 3/4, -ln 1/4, ln 2 (y = 1/2 at r = 0), mean of the three
    assert out["log_loss"] == pytest.approx((-math.log(0.75) - math.log(0.25) + math.log(2)) / 3)
    assert out["pair_accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_the_heads_learn_a_separable_rule_and_disagree_where_data_are_thin() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=g)
    y = (x[:, 0] > 0).float()
    ensemble = Ensemble(heads=4, dim=3, l2=1e-3)
    bootstrap = torch.poisson(torch.ones(4, 60), generator=g)
    ensemble.fit(
        x, y, torch.ones(60, dtype=torch.bool), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0), bootstrap
    )
    mean, spread = ensemble.score(x)
    assert ((mean > 0).float() == y).float().mean() > 0.95
    assert (spread > 0).all()
    pessimistic, _ = ensemble.score(x, kappa=2.0)
    torch.testing.assert_close(pessimistic, mean - 2 * spread)
    far = torch.tensor([[30.0, 0.0, 0.0]])  # beyond the data: the heads spread apart more than on it
    assert ensemble.score(far)[1].item() > spread.mean().item()


def test_pairs_alone_order_the_answers() -> None:
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    pairs = torch.tensor([[1, 0], [2, 1], [3, 2]])  # each answer over the one below it
    ensemble = Ensemble(heads=1, dim=1, l2=1e-3)
    ensemble.fit(x, torch.zeros(4), torch.zeros(4, dtype=torch.bool), pairs, torch.ones(3), torch.ones(1, 4))
    r = ensemble.scores(x)[0]
    assert (r[1:] > r[:-1]).all()


def events_like(labels: list[tuple[str, str]]) -> list:
    """Stand-ins for FeedbackEvents: the fields `Rated.of` reads."""
    return [
        SimpleNamespace(
            response_id=rid,
            kind=FeedbackKind.thumb,
            value=v,
            paired_response_id=None,
            ranking_id=None,
            ranking_size=None,
        )
        for rid, v in labels
    ]


def test_a_batch_is_scored_before_it_is_trained_on_and_the_state_round_trips() -> None:
    g = torch.Generator().manual_seed(1)
    model = RewardModel(heads=3, dim=2, capacity=40, seed=0)
    x = torch.randn(32, 2, generator=g)
    first = events_like([(f"a{i}", "up" if x[i, 0] > 0 else "down") for i in range(32)])
    assert "accuracy" not in model.observe(first, x)  # nothing to score with yet
    assert len(model) == 32
    # the next batch says the opposite of what the model learnt: scored first, it is all wrong
    y = torch.randn(16, 2, generator=g)
    flipped = events_like([(f"b{i}", "down" if y[i, 0] > 0 else "up") for i in range(16)])
    out = model.observe(flipped, y)
    assert out["accuracy"] < 0.2 and out["n"] == 16 and out["run_accuracy"] == out["accuracy"]
    assert len(model) == 40  # the oldest 8 were let go
    assert model.observe(flipped, y) == {}  # repeats rate nothing new

    state = model.state_dict()
    again = RewardModel(heads=3, dim=2, capacity=40, seed=5)
    again.load_state_dict(state)
    torch.testing.assert_close(again.score(y)[0], model.score(y)[0])
    assert again.run_figures() == model.run_figures() and [r.response_id for r in again.rated] == [
        r.response_id for r in model.rated
    ]
