"""The reward model: a learnt score r(x, y) of an answer y to a prompt x, from every kind of human rating.

Model: an ensemble of M linear heads on the base model's hidden states (the frozen base, adapter off; never
a second copy of its weights). With h the base's middle-layer states, h_t at response token t of T:

    phi(x, y) = [h_T ; hbar ; xbar ; hbar * xbar]             hbar, xbar: mean h over y, x (policy `features`)
    z         = (phi - mu) / sigma                            standardised over the training answers
    r_m(x, y) = w_m . z + b_m                                 m = 1..M

Losses (InstructGPT, Ouyang et al. 2022; Stiennon et al. 2020; pointwise as in Sun et al. 2025):

    thumbs, ratings    L_point = BCE(sigma(r), y)        y = 1 up, 0 down; a rating q in 1..5: y = (q - 1) / 4
    choices, rankings  L_pair  = -log sigma(r_w - r_l)    for every pair (w preferred to l)
    head m             L_m = sum_i u_mi L_point,i / sum_i u_mi + sum_p u_mp c_p L_pair,p / sum_p u_mp c_p
                             + lambda ||w_m||^2

A comparison counts once: the C(K, 2) pairs of a K-answer ranking share its weight, c_p = 1 / C(K, 2), as
InstructGPT keeps a ranking's pairs together (the K - 1 pairs of a best-of-K choice likewise, 1 / (K - 1)).
u_mi ~ Poisson(1) x rater weight (learner/raters.py) is head m's online-bootstrap weight of rating i (Oza and
Russell 2001), drawn once, so every head fits its own resample and the heads disagree where ratings are thin:

    mean(x, y) = 1/M sum_m r_m        spread(x, y) = std_m r_m        pessimistic = mean - kappa * spread

Evaluated prequentially (Dawid 1984): every new batch of ratings is scored before the model trains on it
(`prequential`): accuracy and AUC of sigma(mean) on thumbs and ratings, log-loss, and the share of pairs
ordered right.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from thumbtune.core.contract import FeedbackEvent, FeedbackKind


@dataclass(frozen=True)
class Rated:
    """What the reward model keeps of a rated answer besides its features: enough for its label and pairs."""

    response_id: str
    kind: FeedbackKind
    value: str | int
    paired_response_id: str | None = None
    ranking_id: str | None = None
    ranking_size: int | None = None

    @classmethod
    def of(cls, event: FeedbackEvent) -> Rated:
        return cls(
            event.response_id,
            event.kind,
            event.value,
            event.paired_response_id,
            event.ranking_id,
            event.ranking_size,
        )


def pointwise_label(rated: Rated) -> float | None:
    """y of a thumb (1 up, 0 down) or a rating q in 1..5 ((q - 1) / 4); None for relative feedback."""
    if rated.kind is FeedbackKind.thumb:
        return 1.0 if rated.value == "up" else 0.0
    if rated.kind is FeedbackKind.rating:
        return (int(rated.value) - 1) / 4
    return None


@dataclass(frozen=True)
class Pair:
    """Answer ``winner`` preferred to answer ``loser`` (response ids), with its share of one comparison."""

    winner: str
    loser: str
    weight: float


def pairs_of(events: list[Rated]) -> list[Pair]:
    """Every pair the choices and rankings among ``events`` state, each comparison weighing 1 in all.

    A choice's rejected answer names the chosen one (``paired_response_id``), so a best-of-K choice gives
    K - 1 pairs of weight 1 / (K - 1); a ranking's events share a ``ranking_id`` and their places give
    C(K, 2) pairs of weight 1 / C(K, 2). Only pairs whose both answers are among ``events`` are returned.
    """
    present = {e.response_id for e in events}
    pairs: list[Pair] = []
    rejected_by: dict[str, list[str]] = defaultdict(list)
    rankings: dict[str, list[Rated]] = defaultdict(list)
    for e in events:
        if e.kind is FeedbackKind.choice and e.value == "rejected" and e.paired_response_id in present:
            rejected_by[e.paired_response_id].append(e.response_id)
        elif e.kind is FeedbackKind.ranking:
            rankings[e.ranking_id].append(e)
    for winner, losers in rejected_by.items():
        pairs += [Pair(winner, loser, 1 / len(losers)) for loser in losers]
    for ranked in rankings.values():
        if len(ranked) != ranked[0].ranking_size:
            continue  # the rest of this ranking has not arrived yet
        ranked = sorted(ranked, key=lambda e: e.value)
        weight = 1 / math.comb(len(ranked), 2)
        pairs += [
            Pair(w.response_id, loser.response_id, weight)
            for i, w in enumerate(ranked)
            for loser in ranked[i + 1 :]
        ]
    return pairs


def pointwise_loss(scores: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """sum_i u_i BCE(sigma(r_i), y_i) / sum_i u_i: scores r [N], labels y [N] in [0, 1], weights u [N]."""
    losses = F.binary_cross_entropy_with_logits(scores, labels, reduction="none")
    return (weights * losses).sum() / weights.sum().clamp(min=1e-12)


def pairwise_loss(winners: Tensor, losers: Tensor, weights: Tensor) -> Tensor:
    """Bradley-Terry: sum_p u_p (-log sigma(r_w - r_l)) / sum_p u_p over pairs p, scores [P], weights [P]."""
    losses = -F.logsigmoid(winners - losers)
    return (weights * losses).sum() / weights.sum().clamp(min=1e-12)


def auc(scores: Tensor, labels: Tensor) -> float:
    """P(score of a positive > score of a negative), ties counting half; nan without both classes.
    Soft labels count as positive above 1/2."""
    positive, negative = scores[labels > 0.5], scores[labels <= 0.5]
    if len(positive) == 0 or len(negative) == 0:
        return math.nan
    above = (positive[:, None] > negative[None, :]).double().mean()
    tied = (positive[:, None] == negative[None, :]).double().mean()
    return float(above + 0.5 * tied)


@dataclass
class Ensemble:
    """M linear heads on standardised features; `fit` on weighted point labels and pairs."""

    heads: int
    dim: int
    l2: float = 1e-2
    weight: Tensor = field(init=False)
    """[M, D]"""
    bias: Tensor = field(init=False)
    """[M]"""
    mu: Tensor = field(init=False)
    sigma: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.weight = torch.zeros(self.heads, self.dim)
        self.bias = torch.zeros(self.heads)
        self.mu = torch.zeros(self.dim)
        self.sigma = torch.ones(self.dim)

    def scores(self, features: Tensor) -> Tensor:
        """r_m for every head and answer: [M, N] from features [N, D]."""
        z = (features.float() - self.mu) / self.sigma
        return self.weight @ z.T + self.bias[:, None]

    def score(self, features: Tensor, kappa: float = 0.0) -> tuple[Tensor, Tensor]:
        """(mean - kappa * spread, spread) over the heads, each [N]."""
        r = self.scores(features)
        spread = r.std(0) if self.heads > 1 else torch.zeros(r.shape[1])
        return r.mean(0) - kappa * spread, spread

    def fit(
        self,
        features: Tensor,
        labels: Tensor,
        point: Tensor,
        pairs: Tensor,
        pair_weights: Tensor,
        bootstrap: Tensor,
        max_iter: int = 100,
    ) -> float:
        """Fit every head (L-BFGS from its current weights) and return the heads' mean training loss.

        features [N, D]; labels [N] (y, any value where ``point`` is False); point [N] bool: has a pointwise
        label; pairs [P, 2] indices (winner, loser); pair_weights [P] (c_p); bootstrap [M, N] (u_mi; a pair
        weighs the product of its two answers' u and c_p).
        """
        x = features.float()
        self.mu = x.mean(0)
        self.sigma = x.std(0, unbiased=False).clamp(min=1e-4) if len(x) > 1 else torch.ones(self.dim)
        z = (x - self.mu) / self.sigma
        losses = []
        for m in range(self.heads):
            u = bootstrap[m]
            u_pair = u[pairs[:, 0]] * u[pairs[:, 1]] * pair_weights if len(pairs) else pair_weights
            loss, self.weight[m], self.bias[m] = self._fit_head(
                z, labels, point, pairs, u, u_pair, self.weight[m], self.bias[m], max_iter
            )
            losses.append(loss)
        return sum(losses) / len(losses)

    def _fit_head(
        self,
        z: Tensor,
        labels: Tensor,
        point: Tensor,
        pairs: Tensor,
        u: Tensor,
        u_pair: Tensor,
        w0: Tensor,
        b0: Tensor,
        max_iter: int,
    ) -> tuple[float, Tensor, Tensor]:
        """One head's L_m minimised by L-BFGS from (w0, b0); returns (loss, w, b)."""
        w = w0.clone().requires_grad_(True)
        b = b0.reshape(1).clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            r = z @ w + b
            loss = self.l2 * (w**2).sum()
            if point.any():
                loss = loss + pointwise_loss(r[point], labels[point], u[point])
            if len(pairs):
                loss = loss + pairwise_loss(r[pairs[:, 0]], r[pairs[:, 1]], u_pair)
            loss.backward()
            return loss

        loss = float(optimizer.step(closure).detach())
        return loss, w.detach(), b.detach()[0]

    def state_dict(self) -> dict[str, Tensor]:
        return {"weight": self.weight, "bias": self.bias, "mu": self.mu, "sigma": self.sigma}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name in ("weight", "bias", "mu", "sigma"):
            if state[name].shape != getattr(self, name).shape:
                raise ValueError(
                    f"reward model {name} is {tuple(state[name].shape)}, expected "
                    f"{tuple(getattr(self, name).shape)} (THUMBTUNE_LEARNER_REWARD_MODEL_HEADS?)"
                )
            setattr(self, name, state[name].float().clone())


def prequential(
    mean: Tensor, labels: Tensor, point: Tensor, winners: Tensor, losers: Tensor
) -> dict[str, float]:
    """How well scores made before training predict the ratings they are then trained on.

    accuracy   share of thumbs and ratings with sign(r) = sign(y - 1/2) (ratings of 3, y = 1/2, left out)
    auc        `auc` of r on them;   log_loss  BCE(sigma(r), y) on them
    pair_accuracy  share of pairs with r_w > r_l (ties count half)
    n, pairs   how many of each were scored
    """
    out: dict[str, float] = {"n": float(point.sum()), "pairs": float(len(winners))}
    if point.any():
        r, y = mean[point], labels[point]
        decided = y != 0.5
        out["accuracy"] = (
            float(((r[decided] > 0) == (y[decided] > 0.5)).double().mean()) if decided.any() else math.nan
        )
        out["auc"] = auc(r, y)
        out["log_loss"] = float(F.binary_cross_entropy_with_logits(r, y))
    if len(winners):
        out["pair_accuracy"] = float(
            ((winners > losers).double() + 0.5 * (winners == losers).double()).mean()
        )
    return out


class RewardModel:
    """The ensemble and the rated answers it is fitted on: the newest ``capacity`` of them, with their
    features, labels and bootstrap weights. `observe` takes each new batch: score it, keep it, refit."""

    def __init__(
        self, heads: int, dim: int, capacity: int = 2048, l2: float = 1e-2, seed: int = 0, window: int = 128
    ) -> None:
        self.ensemble = Ensemble(heads, dim, l2)
        self.recent: deque[float] = deque(maxlen=window)
        """1 / 0 (a tied pair 1/2) per prequential outcome, newest last: thumbs and ratings by sign, pairs."""
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(seed)
        self.rated: list[Rated] = []
        self.features = torch.zeros(0, dim, dtype=torch.float16)
        """[N, D], half precision: enough to tell hidden states apart, and the learner state stays small."""
        self.bootstrap = torch.zeros(heads, 0)
        self.totals: dict[str, float] = defaultdict(float)
        """Running sums over every batch scored so far (prequential over the whole run)."""

    def __len__(self) -> int:
        return len(self.rated)

    def _tensors(self, rated: list[Rated]) -> tuple[Tensor, Tensor]:
        labels = [pointwise_label(r) for r in rated]
        point = torch.tensor([y is not None for y in labels], dtype=torch.bool)
        return torch.tensor([0.5 if y is None else y for y in labels]), point

    def observe(
        self, events: list[FeedbackEvent] | list[Rated], features: Tensor, weights: Tensor | None = None
    ) -> dict[str, float]:
        """Score ``events`` (or their `Rated`s; features [B, D], rater ``weights`` [B], default 1) before
        training on them, then keep and refit. Returns the batch's prequential figures, the run's (``run_*``)
        and the fit's loss."""
        new = [e if isinstance(e, Rated) else Rated.of(e) for e in events]
        known = {r.response_id for r in self.rated}
        keep = [i for i, r in enumerate(new) if r.response_id not in known]  # a repeat rates nothing new
        new, features = [new[i] for i in keep], features[keep]
        weights = torch.ones(len(new)) if weights is None else weights.float()[keep]
        if not new:
            return {}
        rated = self.rated + new
        index = {r.response_id: i for i, r in enumerate(rated)}
        all_features = torch.cat([self.features, features.to(torch.float16)])
        pairs = pairs_of(rated)
        fresh = {r.response_id for r in new}
        new_pairs = [p for p in pairs if p.winner in fresh or p.loser in fresh]

        # prequential: the model as it was, on what it has not seen
        labels, point = self._tensors(new)
        scores = self.ensemble.score(all_features)[0]
        winners = scores[[index[p.winner] for p in new_pairs]]
        losers = scores[[index[p.loser] for p in new_pairs]]
        figures = prequential(scores[len(self.rated) :], labels, point, winners, losers) if len(self) else {}
        self._add_to_totals(figures)
        if len(self):
            r, y = scores[len(self.rated) :][point], labels[point]
            decided = y != 0.5
            self.recent.extend(((r[decided] > 0) == (y[decided] > 0.5)).double().tolist())
            self.recent.extend(((winners > losers).double() + 0.5 * (winners == losers).double()).tolist())

        # keep the newest `capacity` answers, with bootstrap weights drawn once for each
        draws = torch.poisson(torch.ones(self.ensemble.heads, len(new)), generator=self.generator) * weights
        self.rated, self.features = rated, all_features
        self.bootstrap = torch.cat([self.bootstrap, draws], dim=1)
        if len(self.rated) > self.capacity:
            drop = len(self.rated) - self.capacity
            self.rated, self.features, self.bootstrap = (
                self.rated[drop:],
                self.features[drop:],
                self.bootstrap[:, drop:],
            )
        loss = self.refit()
        run = {f"run_{k}": v for k, v in self.run_figures().items()}
        return figures | run | {"fit_loss": loss, "answers": float(len(self))}

    def refit(self) -> float:
        labels, point = self._tensors(self.rated)
        index = {r.response_id: i for i, r in enumerate(self.rated)}
        pairs = pairs_of(self.rated)
        pair_index = torch.tensor(
            [[index[p.winner], index[p.loser]] for p in pairs], dtype=torch.long
        ).reshape(-1, 2)
        pair_weights = torch.tensor([p.weight for p in pairs])
        return self.ensemble.fit(self.features, labels, point, pair_index, pair_weights, self.bootstrap)

    def _add_to_totals(self, figures: dict[str, float]) -> None:
        n, pairs = figures.get("n", 0.0), figures.get("pairs", 0.0)
        for name, count in (("accuracy", n), ("log_loss", n), ("pair_accuracy", pairs)):
            if name in figures and not math.isnan(figures[name]):
                self.totals[name] += figures[name] * count
                self.totals[f"{name}_n"] += count

    def run_figures(self) -> dict[str, float]:
        """Accuracy, log-loss and pair accuracy over every batch scored so far, weighted by its size."""
        return {
            name: self.totals[name] / self.totals[f"{name}_n"]
            for name in ("accuracy", "log_loss", "pair_accuracy")
            if self.totals.get(f"{name}_n")
        }

    def recent_accuracy(self) -> tuple[float, int]:
        """(share right, how many) of the newest ``window`` prequential outcomes; (nan, 0) before any."""
        return (sum(self.recent) / len(self.recent) if self.recent else math.nan), len(self.recent)

    def trusted(self, floor: float) -> bool:
        """Whether the window is full and its prequential accuracy is at least ``floor``."""
        accuracy, n = self.recent_accuracy()
        return n == self.recent.maxlen and accuracy >= floor

    def score(self, features: Tensor, kappa: float = 0.0) -> tuple[Tensor, Tensor]:
        """(pessimistic score, spread) of answers with these features (`Ensemble.score`)."""
        return self.ensemble.score(features, kappa)

    def state_dict(self) -> dict:
        return {
            "ensemble": self.ensemble.state_dict(),
            "rated": [r.__dict__ | {"kind": r.kind.value} for r in self.rated],
            "features": self.features,
            "bootstrap": self.bootstrap,
            "generator": self.generator.get_state(),
            "totals": dict(self.totals),
            "recent": list(self.recent),
        }

    def load_state_dict(self, state: dict) -> None:
        self.ensemble.load_state_dict(state["ensemble"])
        self.rated = [Rated(**(r | {"kind": FeedbackKind(r["kind"])})) for r in state["rated"]]
        self.features, self.bootstrap = state["features"], state["bootstrap"]
        self.generator.set_state(state["generator"])
        self.totals = defaultdict(float, state["totals"])
        self.recent.extend(state.get("recent", []))
