"""Prometheus metrics of the learner, served on its own ``/metrics`` (THUMBTUNE_LEARNER_METRICS_PORT).

They live in a registry of their own (`REGISTRY`, plus the process collectors), so the learner's
``/metrics`` exports learner series only, whatever else its process imports. Names start with
``thumbtune_learner_`` so a dashboard can scrape the server and the learner into one Prometheus without
clashes. Label sets are bounded: the labels are the drop reason (codes outside `DROP_REASONS` count as
``other``: a producer sending garbage must not mint new series) and a restore's actor (`ACTORS`, else
``other``).

Every diagnostic `learner.update.ppo_update` returns is a gauge holding the last update's value, so the
quantities an RL practitioner watches first (approx-KL, clip fraction, explained variance, KL to the
reference and its beta) are one query away.
"""

from __future__ import annotations

import logging
from collections import Counter as TallyCounter
from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from thumbtune.core.contract import version_number

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
"""The learner's metrics (and the process's CPU, memory, GC and platform), nothing else."""
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

DROP_REASONS = (
    "not_json",
    "schema",
    "logprob_count",
    "fingerprint",
    "empty_prompt",
    "empty_response",
    "token_out_of_vocab",
    "bad_logprob",
    "too_long",
    "bad_adapter_version",
    "duplicate",
    "stale",
    "future_version",
)
"""The reason codes learner/events.py and learner/trainer.py produce; anything else is ``other``."""

EVENTS_CONSUMED = Counter(
    "thumbtune_learner_events_consumed_total",
    "Feedback records read from Kafka (valid or not).",
    registry=REGISTRY,
)
EVENTS_DROPPED = Counter(
    "thumbtune_learner_events_dropped_total",
    "Feedback records not trained on, by reason code.",
    ["reason"],
    registry=REGISTRY,
)
for _reason in (*DROP_REASONS, "other"):  # zero from the start: a series born at 1 shows no increase()
    EVENTS_DROPPED.labels(reason=_reason)
EVENTS_TRAINED = Counter(
    "thumbtune_learner_events_trained_total", "Events that went into a version.", registry=REGISTRY
)
CONSUMER_LAG = Gauge(
    "thumbtune_learner_consumer_lag",
    "Feedback records not yet consumed: end offset - position, summed over the learner's partitions.",
    registry=REGISTRY,
)
BUFFERED = Gauge(
    "thumbtune_learner_buffered_events", "Admitted events waiting for the next update.", registry=REGISTRY
)
BATCH_SIZE = Histogram(
    "thumbtune_learner_batch_size",
    "Events per update.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=REGISTRY,
)
UPDATE_DURATION = Histogram(
    "thumbtune_learner_update_duration_seconds",
    "One update: PPO epochs plus writing the version.",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
    registry=REGISTRY,
)
VERSIONS = Counter(
    "thumbtune_learner_versions_total", "Adapter versions written by this process.", registry=REGISTRY
)
REFINE_VERSIONS = Counter(
    "thumbtune_learner_refine_versions_total",
    "Versions trained on the learner's own answers alone between human batches (refine_rounds).",
    registry=REGISTRY,
)
ANNOUNCEMENTS = Counter(
    "thumbtune_learner_announcements_total",
    "Versions announced on thumbtune.adapters (re-announcements too).",
    registry=REGISTRY,
)
COMMIT_FAILURES = Counter(
    "thumbtune_learner_commit_failures_total",
    "Offset commits that failed (harmless: manifests hold offsets).",
    registry=REGISTRY,
)
ACTORS = ("admin", "checks", "canary")
"""Who decides on thumbtune.control (`ControlRecord.actor`); anything else is ``other``."""
RESTORES = Counter(
    "thumbtune_learner_restores_total",
    "Updates that started from an older version because the learner's head was refused or rolled back "
    "from on thumbtune.control, by who decided.",
    ["actor"],
    registry=REGISTRY,
)
for _actor in (*ACTORS, "other"):
    RESTORES.labels(actor=_actor)
REFUSED_VERSIONS = Gauge(
    "thumbtune_learner_refused_versions",
    "Versions the learner knows were refused or rolled back from (it never trains on from them).",
    registry=REGISTRY,
)
CURRENT_VERSION = Gauge(
    "thumbtune_learner_current_version", "N of the adapter version v<N> in memory.", registry=REGISTRY
)

DIAGNOSTICS: dict[str, tuple[str, str]] = {
    # ppo_update's name -> (metric name suffix, help)
    "policy_loss": ("policy_loss", "Clipped surrogate loss, mean over minibatches."),
    "value_loss": ("value_loss", "Clipped value loss, mean over minibatches."),
    "entropy": ("entropy_nats", "Mean per-token entropy of pi_old."),
    "approx_kl": ("approx_kl", "Approx-KL(pi_old || pi_theta) per token, mean over minibatches."),
    "kl_ref": ("kl_ref_nats", "KL(pi_old || pi_ref) per response (sum over tokens), batch mean."),
    "kl_ref_k3_per_token": ("kl_ref_k3_per_token_nats", "k3 estimate of KL(pi_old || pi_ref) per token."),
    "kl_loss": ("kl_loss_nats", "Exact KL(pi_theta || pi_ref) per token in the loss (when kl_coef > 0)."),
    "beta": ("beta", "KL penalty coefficient used in the last update."),
    "beta_next": ("beta_next", "KL penalty coefficient for the next update."),
    "clipfrac": ("clip_fraction", "Fraction of tokens whose ratio was clipped."),
    "explained_variance": ("explained_variance", "1 - Var(returns - V) / Var(returns)."),
    "mean_reward": ("mean_reward", "Mean user reward of the last batch."),
    "mean_normalized_reward": ("mean_normalized_reward", "Mean running-normalised reward of the last batch."),
    "is_weight_mean": ("is_weight_mean", "Mean truncated importance weight min(c, pi_old / pi_b)."),
    "is_ess": ("is_effective_sample_size", "Effective sample size fraction of the importance weights."),
    "response_length": ("response_length_tokens", "Mean response length of the last batch."),
    "response_length_drift": (
        "response_length_drift_tokens",
        "Last batch's mean response length minus the running mean before it.",
    ),
    "grad_norm": ("grad_norm", "Gradient norm before clipping, mean over minibatches."),
    "n_tokens": ("tokens", "Response tokens in the last batch."),
    "epochs": ("epochs", "Epochs the last update ran (fewer when it stopped early on approx-KL)."),
    "early_stopped": ("early_stopped", "1 when the last update stopped early on approx-KL."),
    "tokens_per_s": ("tokens_per_second", "Training throughput of the last update."),
    "average_gap": (
        "average_gap",
        "||theta - w|| / ||w||: how far the trained LoRA weights are ahead of the published average.",
    ),
    # the reward model (learner/reward_model.py), each batch scored before it is trained on (prequential)
    "reward_model.accuracy": (
        "reward_model_accuracy",
        "Reward model: share of the last batch's thumbs and "
        "ratings it predicted the sign of, before training on them.",
    ),
    "reward_model.auc": (
        "reward_model_auc",
        "Reward model: AUC on the last batch's thumbs and ratings, before training on them.",
    ),
    "reward_model.log_loss": (
        "reward_model_log_loss",
        "Reward model: log-loss on the last batch's thumbs and ratings, before training on them.",
    ),
    "reward_model.pair_accuracy": (
        "reward_model_pair_accuracy",
        "Reward model: share of the last batch's compared pairs it ordered right, before training on them.",
    ),
    "reward_model.run_accuracy": (
        "reward_model_run_accuracy",
        "Reward model: prequential accuracy over every batch so far.",
    ),
    "reward_model.run_pair_accuracy": (
        "reward_model_run_pair_accuracy",
        "Reward model: prequential pair accuracy over every batch so far.",
    ),
    "reward_model.answers": ("reward_model_answers", "Rated answers the reward model is fitted on."),
    "reward_model.recent_accuracy": (
        "reward_model_recent_accuracy",
        "Reward model: prequential accuracy over its newest reward_model_window outcomes (thumbs, ratings "
        "and pairs), what the accuracy floor is judged on.",
    ),
    "reward_model.trusted": (
        "reward_model_trusted",
        "1 while the reward model meets its accuracy floor (its scores may train the policy), else 0.",
    ),
    "signal.reward_model_share": (
        "reward_model_share",
        "Share of the last update's answers that were the learner's own, scored by the reward model.",
    ),
    "signal.human_answers": ("human_answers", "Human-rated answers PPO trained on in the last update."),
    "signal.own_answers": ("own_answers", "The learner's own answers PPO trained on in the last update."),
    "rollout.reward": (
        "rollout_reward",
        "Mean pessimistic reward-model score (in thumb units, -1..1) of the learner's own answers.",
    ),
    "rollout.spread": ("rollout_spread", "Mean spread of the ensemble's heads on the learner's own answers."),
    "rollout.sample_s": ("rollout_sample_seconds", "Sampling the learner's own answers in the last update."),
    "ptx_nll": (
        "ptx_nll_nats",
        "Negative log-likelihood per token of the pretraining-mix passages (when ptx_coef > 0).",
    ),
    "reward_model.update_s": (
        "reward_model_update_seconds",
        "Reward model: scoring and fitting the last batch, features included.",
    ),
    # rater influence limits (learner/raters.py)
    "raters.top_share": (
        "rater_top_share",
        "The largest rater's share of the last update's human ratings, before the cap.",
    ),
    "raters.top_share_capped": (
        "rater_top_share_capped",
        "The largest rater's share of the last update's human-rating weight, after the cap.",
    ),
    "raters.window_top_share": (
        "rater_window_top_share",
        "The largest rater's share of the newest rater_window human ratings, before the cap.",
    ),
    "raters.window_top_share_capped": (
        "rater_window_top_share_capped",
        "The largest rater's share of the newest rater_window human ratings, after the cap.",
    ),
    "raters.window": ("raters_in_window", "Distinct raters among the newest rater_window human ratings."),
    "raters.capped": ("raters_capped", "Raters whose ratings were down-weighted in the last update."),
    "raters.weight_removed": (
        "rater_weight_removed",
        "Ratings' worth of weight the cap took off the last update (sum of 1 - u_i).",
    ),
}
_DIAGNOSTIC_GAUGES = {
    name: Gauge(f"thumbtune_learner_{suffix}", help_, registry=REGISTRY)
    for name, (suffix, help_) in DIAGNOSTICS.items()
}


class DropCounter:
    """Mirrors a `SkipCounter`'s running totals into EVENTS_DROPPED with bounded labels.

    Why a diff and not a hook: the skip counter is shared with the file replay, which has no metrics.
    """

    def __init__(self) -> None:
        self._seen: TallyCounter[str] = TallyCounter()

    def sync(self, totals: Mapping[str, int]) -> None:
        for code, total in totals.items():
            new = total - self._seen[code]
            if new > 0:
                EVENTS_DROPPED.labels(reason=code if code in DROP_REASONS else "other").inc(new)
                self._seen[code] = total


def record_update(version: str, batch_size: int, seconds: float, diagnostics: Mapping[str, float]) -> None:
    """Everything one finished update changes."""
    VERSIONS.inc()
    EVENTS_TRAINED.inc(batch_size)
    if batch_size:
        BATCH_SIZE.observe(batch_size)
    else:
        REFINE_VERSIONS.inc()
    UPDATE_DURATION.observe(seconds)
    set_version(version)
    for name, gauge in _DIAGNOSTIC_GAUGES.items():
        if name in diagnostics:
            gauge.set(diagnostics[name])


def actor_label(actor: str) -> str:
    """A control record's actor as a bounded label."""
    return actor if actor in ACTORS else "other"


def set_version(version: str) -> None:
    CURRENT_VERSION.set(version_number(version))


def start_metrics_server(host: str, port: int) -> WSGIServer | None:
    """Serve /metrics on host:port in a daemon thread; None when port is 0 (metrics off)."""
    if port == 0:
        return None
    try:
        server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        raise RuntimeError(
            f"cannot serve the learner's /metrics on {host}:{port} ({exc.strerror}); set "
            "THUMBTUNE_LEARNER_METRICS_PORT to a free port, or 0 to turn metrics off"
        ) from exc
    log.info("learner metrics on http://%s:%d/metrics", host, port)
    return server
