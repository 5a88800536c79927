"""OpenAI-compatible request and response models, plus thumbtune's feedback API. Models only.

Limits that do not depend on settings are declared here, so bad input is refused by
validation with a message naming the field. Settings-dependent limits (max_tokens cap,
message count, context window) are checked in service.serving_chat.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    @model_validator(mode="after")
    def _not_empty(self) -> ChatMessage:
        if not self.text.strip():
            raise ValueError(f"{self.role} message content must not be empty")
        return self


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Unknown OpenAI parameters are ignored, as many servers do; the ones that would change
    # the meaning of the answer if ignored are refused below.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=4)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    user: str | None = Field(default=None, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=0, description="Only 0 is supported.")
    tools: list | None = None
    response_format: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s or len(s) > 64 for s in stops):
            raise ValueError("stop sequences must be 1 to 64 characters")
        return stops

    @model_validator(mode="after")
    def _unsupported(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools are not supported by this server")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("only response_format {'type': 'text'} is supported")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None
    response_id: str = Field(description="thumbtune extension: the id to rate this answer with.")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage
    adapter_version: str = Field(description="thumbtune extension: the adapter version that answered.")


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None
    response_id: str


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "thumbtune"
    root: str
    adapter_version: str | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


ResponseId = Annotated[str, Field(min_length=1, max_length=128)]


class FeedbackRequest(BaseModel):
    """One of {response_id, thumb}, {response_id, rating}, {chosen, rejected}, {ranking}; a comment."""

    model_config = ConfigDict(extra="forbid")

    response_id: ResponseId | None = None
    thumb: Literal["up", "down"] | None = None
    rating: int | None = Field(default=None, ge=1, le=5)
    chosen: ResponseId | None = None
    rejected: ResponseId | list[ResponseId] | None = Field(
        default=None,
        description="The other answer, or (best of up to 4 answers to one prompt) the 1 to 3 others.",
    )
    ranking: list[ResponseId] | None = Field(
        default=None,
        min_length=2,
        max_length=4,
        description="All the answers of one request (n = 2 to 4), best first.",
    )
    comment: str | None = Field(default=None, max_length=2000)

    @model_validator(mode="after")
    def _one_form(self) -> FeedbackRequest:
        single = self.response_id is not None
        pair = self.chosen is not None or self.rejected is not None
        ranked = self.ranking is not None
        if single + pair + ranked != 1:
            raise ValueError(
                "give one of: response_id with thumb or rating; chosen and rejected; a ranking, best first"
            )
        if ranked:
            if len(set(self.ranking)) != len(self.ranking):
                raise ValueError("a ranking names each answer once")
            if self.thumb is not None or self.rating is not None:
                raise ValueError("a ranking takes no thumb or rating")
        if single and (self.thumb is None) == (self.rating is None):
            raise ValueError("give exactly one of thumb ('up' or 'down') or rating (1 to 5)")
        if pair:
            if self.chosen is None or self.rejected is None:
                raise ValueError("a choice needs both chosen and rejected response ids")
            rejected = self.rejected_ids
            if not 1 <= len(rejected) <= 3:
                raise ValueError("a choice rejects 1 to 3 answers")
            if self.chosen in rejected or len(set(rejected)) != len(rejected):
                raise ValueError("chosen and rejected must be different answers")
            if self.thumb is not None or self.rating is not None:
                raise ValueError("a choice takes no thumb or rating")
        return self

    @property
    def rejected_ids(self) -> list[str]:
        """``rejected`` as a list (one id or several)."""
        if self.rejected is None:
            return []
        return [self.rejected] if isinstance(self.rejected, str) else list(self.rejected)


class FeedbackAccepted(BaseModel):
    status: Literal["accepted", "duplicate"]
    event_ids: list[str]


# --- operators: GET /readyz and /admin/adapters ------------------------------------------------------------


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
