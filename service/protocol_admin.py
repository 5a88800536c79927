"""The operators' API: GET /readyz and everything under /admin/adapters. Models only (the OpenAI-compatible
chat and the feedback API are service/protocol.py's)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Health(BaseModel):
    """GET /healthz: the process answers."""

    status: Literal["ok"]


class Readiness(BaseModel):
    """GET /readyz: ready when the model is loaded, the completion store answers, and feedback can be taken
    (the broker is reachable, or the spool has room)."""

    status: Literal["ready", "not ready", "starting"]
    model: bool | None = Field(default=None, description="The engine thread is running.")
    store: bool | None = Field(default=None, description="The completion store answers (Redis: a ping).")
    broker: bool | None = Field(default=None, description="The last attempt to reach Kafka succeeded.")
    spool_depth: int | None = Field(default=None, description="Ratings waiting in the spool for Kafka.")
    spool_has_room: bool | None = None
    adapter_version: str | None = Field(default=None, description="The live adapter version.")


class AdapterVersionView(BaseModel):
    """One version as this replica knows it: in the store, loaded, checked, live, rated."""

    version: str
    state: Literal["good", "refused", "unchecked"]
    stage: Literal["unchecked", "checked", "canary", "live", "retired", "refused"] = Field(
        description="checked: passed its checks, not serving; canary: serves a share of users; retired: "
        "served (live or canary) and was superseded."
    )
    in_store: bool
    loaded: bool
    live: bool
    pinned: bool
    ratings: int = Field(
        description="Ratings of this version's answers: every replica's (the feedback topic), or without a "
        "control plane this process's own."
    )
    approvals: int = Field(description="Of those, the ones with a positive reward.")
    approval_rate: float | None
    approval_interval: list[float] | None = Field(
        default=None, description="95% anytime-valid interval of the approval rate [lower, upper]."
    )
    elo: float | None = Field(
        default=None, description="Bradley-Terry rating from head-to-head choices, Elo scale, live = 1000."
    )
    elo_interval: list[float] | None = Field(default=None, description="Its 95% bootstrap interval.")
    reason: str | None = Field(default=None, description="The check a refused version failed.")
    message: str | None = None
    kl_live: float | None = Field(default=None, description="KL(version || live) on the probe prompts.")
    kl_base: float | None = Field(default=None, description="KL(version || base) on the probe prompts.")
    capability: int | None = Field(
        default=None, description="Capability prompts it answered right at its check (the gate)."
    )
    checked_at: float | None = None


class Refusal(BaseModel):
    reason: str
    message: str


class KLBounds(BaseModel):
    live: float
    base: float
    probe_prompts: int


class FollowerView(BaseModel):
    """The replica's thumbtune.adapters consumer."""

    group_id: str
    assigned: bool
    announcements: int
    last_error: str | None


class ControlView(BaseModel):
    """The replica's view of thumbtune.control, the cluster's decisions."""

    replica: str = Field(description="This replica's name on the log (THUMBTUNE_REPLICA_ID).")
    connected: bool = Field(description="Following the log now; admin actions answer 503 while not.")
    position: int = Field(description="Records of the log read (decisions and receipts).")
    applied: int = Field(description="Decisions this replica applied since it started (replayed ones not).")
    replicas: list[str] = Field(description="The other replicas that joined and have not left.")
    last_error: str | None


class CanaryView(BaseModel):
    """The canary under test, and what the judge's two anytime-valid tests say so far."""

    version: str
    since: float = Field(description="When the cluster made it the canary (unix time).")
    share: float = Field(description="Share of users it serves (THUMBTUNE_CANARY_SHARE).")
    ratings: int = Field(description="Ratings of its answers since then.")
    approvals: int
    live_ratings: int = Field(description="Ratings of the live version's answers since then.")
    live_approvals: int
    difference: list[float] | None = Field(
        description="Approval canary - live: [lower, estimate, upper] of its anytime-valid interval."
    )
    wins: int = Field(description="Head-to-head choices the canary won against live.")
    losses: int
    verdict: Literal["promote", "rollback", "undecided"] | None = Field(
        description="None until the feedback topic has been read to its end."
    )
    reason: str
    expired: bool = Field(description="Undecided for longer than THUMBTUNE_CANARY_MAX_WAIT_S.")
    exhausted: bool = Field(
        description="Undecided after THUMBTUNE_CANARY_REPLACE_AFTER ratings of its answers: the version "
        "waiting, if any, replaces it."
    )
    waiting: str | None = Field(description="The newest checked version waiting for the canary slot.")


class DecisionView(BaseModel):
    """What became of an admin action: the decision on thumbtune.control and who has applied it."""

    record_id: str
    action: str
    version: str | None = Field(description="The version acted on (rollback: the one rolled back to).")
    previous: str | None = Field(description="What was live on the replica that took the call.")
    replica: str = Field(description="The replica that took the call; it has applied the decision.")
    live: str = Field(description="What that replica serves now.")
    confirmed: dict[str, str] = Field(
        description="Other replicas that applied it within THUMBTUNE_CONTROL_CONFIRM_S -> what they serve."
    )
    failed: dict[str, str] = Field(description="Other replicas that could not apply it -> why.")
    unconfirmed: list[str] = Field(
        description="Other replicas known to be up that did not answer in time (they apply it when they read "
        "it; a replica that crashed stays here until it is back)."
    )


class AdaptersView(BaseModel):
    """GET /admin/adapters, and the answer of every POST under it."""

    live: str
    pinned: str | None
    following: bool = Field(description="New versions go live as they are announced (not pinned).")
    loaded: list[str]
    versions: list[AdapterVersionView]
    refused: dict[str, Refusal]
    kl_bounds: KLBounds
    base_model: str
    base_fingerprint: str
    follower: FollowerView | None
    control: ControlView | None = Field(
        default=None,
        description="thumbtune.control; None on a replica of its own (THUMBTUNE_ADAPTER_FOLLOW off).",
    )
    decision: DecisionView | None = Field(
        default=None, description="In the answer of a POST: what it decided."
    )
    canary: CanaryView | None = Field(default=None, description="The canary under test; None without one.")


class RefuseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(min_length=2, max_length=32, description="An adapter version, e.g. 'v7'.")
    reason: str = Field(min_length=1, max_length=2000, description="Why; shown with the refusal everywhere.")


class PinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(min_length=2, max_length=32, description="An adapter version, e.g. 'v7'.")
