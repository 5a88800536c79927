"""Prometheus metrics of the server. Names follow Prometheus conventions (base units, _total).

Label sets are bounded: routes are templates, adapter versions are the handful loaded,
feedback kinds and values are enums. No prompt text ever becomes a label.
"""

from __future__ import annotations

import threading

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram

REGISTRY = prometheus_client.REGISTRY
"""The server's metrics: prometheus_client's default registry, with its process collectors (the learner's
have a registry of their own, learner/metrics.py)."""

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)

REQUESTS = Counter(
    "thumbtune_http_requests_total", "HTTP requests by route and status.", ["route", "method", "status"]
)
REQUEST_LATENCY = Histogram(
    "thumbtune_http_request_duration_seconds",
    "HTTP request latency (whole response).",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge("thumbtune_requests_in_flight", "Chat completions being generated now.")

TIME_TO_FIRST_TOKEN = Histogram(
    "thumbtune_time_to_first_token_seconds",
    "From request admission to the first generated token.",
    buckets=_LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "thumbtune_inter_token_latency_seconds",
    "Time between consecutive tokens of one sequence.",
    buckets=_TOKEN_BUCKETS,
)
PROMPT_TOKENS = Counter("thumbtune_prompt_tokens_total", "Prompt tokens prefilled.")
GENERATED_TOKENS = Counter("thumbtune_generated_tokens_total", "Tokens generated.", ["adapter_version"])
BATCH_SIZE = Histogram(
    "thumbtune_batch_size", "Sequences in each decode step.", buckets=(1, 2, 4, 8, 12, 16, 24, 32, 64)
)
QUEUE_DEPTH = Gauge("thumbtune_engine_queue_depth", "Requests waiting for a batch slot.")

FEEDBACK = Counter(
    "thumbtune_feedback_total",
    "Ratings received, by kind, value and the adapter version that answered.",
    ["kind", "value", "adapter_version"],
)
FEEDBACK_REWARD = Gauge(
    "thumbtune_feedback_reward_sum",
    "Sum of rewards by adapter version (divide by feedback count for the mean).",
    ["adapter_version"],
)
FEEDBACK_APPROVALS = Counter(
    "thumbtune_feedback_approvals_total",
    "Ratings with a positive reward, by adapter version; approval rate = this / thumbtune_feedback_total.",
    ["adapter_version"],
)
FEEDBACK_DUPLICATES = Counter("thumbtune_feedback_duplicates_total", "Repeat ratings answered idempotently.")
RATE_LIMITED = Counter(
    "thumbtune_rate_limited_total", "Requests refused with 429 by the per-client rate limits.", ["route"]
)
RATE_LIMIT_ERRORS = Counter(
    "thumbtune_rate_limit_errors_total", "Rate-limit checks Redis failed (those requests were let through)."
)
EVENTS_PUBLISHED = Counter("thumbtune_events_published_total", "Feedback events acknowledged by Kafka.")
PUBLISH_ERRORS = Counter("thumbtune_publish_errors_total", "Failed attempts to publish feedback events.")
SPOOL_DEPTH = Gauge("thumbtune_spool_depth", "Feedback events waiting in the on-disk spool.")
SPOOL_REJECTED = Counter(
    "thumbtune_spool_rejected_total", "Feedback refused with 503 because the spool is full."
)
BROKER_UP = Gauge("thumbtune_broker_up", "1 when the last publish attempt reached Kafka.")

ACTIVE_ADAPTER = Gauge(
    "thumbtune_active_adapter_info", "1 for the adapter version that is live.", ["adapter_version"]
)

ADAPTER_SWAP_LATENCY = Histogram(
    "thumbtune_adapter_swap_latency_seconds",
    "From receiving an adapter announcement to that version being live (checks, load, KL probe).",
    buckets=_LATENCY_BUCKETS,
)
ADAPTER_SWAPS = Counter(
    "thumbtune_adapter_swaps_total", "Changes of the live adapter version, by what caused them.", ["trigger"]
)
"""trigger: announcement, catchup (found in the store after a group join), startup, pin, unpin, rollback,
refuse (stepped down from a refused version), reconcile (the control log disagreed with what was live)."""
ADAPTER_REFUSED = Counter(
    "thumbtune_adapter_refused_total",
    "Adapter versions refused, by the check that failed (operator: refused through /admin/adapters/refuse).",
    ["reason"],
)
"""reason: one of service/adapters/checks.py's REASONS (the check that failed, operator or canary)."""
CONTROL_DECISIONS = Counter(
    "thumbtune_control_decisions_total",
    "Decisions of thumbtune.control this replica applied, by action, who took them and the outcome.",
    ["action", "actor", "outcome"],
)
"""action: pin, unpin, rollback, refuse, canary, promote; actor: admin, checks, canary; outcome: applied,
ignored (a step another replica's record already took), failed (the error is in the replica's log and in
its receipt on thumbtune.control)."""
CANARY_DIFFERENCE = Gauge(
    "thumbtune_canary_approval_difference",
    "The canary's approval minus live's since the canary started: the anytime-valid interval's bounds.",
    ["bound"],
)
"""bound: lower, upper (the judge rolls back at upper < 0, promotes at lower > -THUMBTUNE_CANARY_MARGIN)."""
CANARY_RATINGS = Gauge(
    "thumbtune_canary_ratings",
    "Evidence on the canary since it started: ratings of its answers, of live's, and head-to-head choices.",
    ["of"],
)
"""of: canary, live, head_to_head."""
VERSION_APPROVAL = Gauge(
    "thumbtune_version_approval_rate",
    "Approved share of all ratings of a version's answers, from every replica's ratings (feedback topic).",
    ["adapter_version"],
)
VERSION_ELO = Gauge(
    "thumbtune_version_elo",
    "Bradley-Terry rating of a version on the Elo scale (live = 1000) from head-to-head choices, with its "
    "95% bootstrap interval.",
    ["adapter_version", "bound"],
)
"""bound: estimate, lower, upper."""
CONTROL_CONNECTED = Gauge(
    "thumbtune_control_connected",
    "1 while this replica follows thumbtune.control, 0 while it cannot (absent on a replica of its own).",
    ["replica"],
)
ADAPTER_PROBE_KL = Gauge(
    "thumbtune_adapter_probe_kl",
    "KL of the last checked version on the probe prompts (nats per token).",
    ["against"],
)
VLLM_PROOF_DIFF = Gauge(
    "thumbtune_vllm_proof_max_diff",
    "Largest |log pi_vllm - log pi_local| (nats) on the proof answer of the last version loaded into vLLM.",
)
"""against: live, base."""


class ApprovalTally:
    """Ratings and approvals per adapter version in this process, for /admin/adapters.

    The Prometheus counters above carry the same numbers, but reading a counter back is not
    what they are for; this is a plain dict behind a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}

    def record(self, adapter_version: str, reward: float) -> None:
        with self._lock:
            counts = self._counts.setdefault(adapter_version, [0, 0])
            counts[0] += 1
            counts[1] += reward > 0

    def get(self, adapter_version: str) -> tuple[int, int]:
        """(ratings, approvals) of a version so far."""
        with self._lock:
            ratings, approvals = self._counts.get(adapter_version, (0, 0))
            return ratings, approvals


APPROVALS = ApprovalTally()
