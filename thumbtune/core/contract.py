"""The wire contract between the server and the learner.

Everything that crosses Kafka or the adapter store is defined here and nowhere else: topic names,
the feedback event, the adapter announcement, the adapter manifest and the file layout of a stored
version. Both sides import this module; it depends on pydantic and the standard library only.

Log-probs (``FeedbackEvent.behaviour_logprobs``)
    For generated token ``a_t`` after context ``s_t`` the server records

        log pi_b(a_t | s_t) = log_softmax(z_t / T)[a_t]

    where ``z_t`` are the serving policy's logits and ``T`` is the request's temperature
    (``T = 1`` when the request was greedy, ``temperature == 0``; at least `MIN_TEMPERATURE` otherwise, so
    z / T stays finite in float32 whatever a request asks for). This is the tempered
    distribution *before* top-p truncation, so it is defined for every token and the
    learner can form importance ratios ``pi_old / pi_b`` by scaling its own logits with
    the same ``T`` (``SamplingParams.logprob_temperature``).
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1

FEEDBACK_TOPIC = "thumbtune.feedback"
ADAPTERS_TOPIC = "thumbtune.adapters"
CONTROL_TOPIC = "thumbtune.control"
"""The cluster's decisions about adapter versions (`ControlRecord`) and the replicas' receipts of them
(`ControlAck`), in one partition so every replica applies them in one order. Kept for ever: a replica that
starts rebuilds the state from the whole log."""
TOPICS = (FEEDBACK_TOPIC, ADAPTERS_TOPIC, CONTROL_TOPIC)

LEARNER_GROUP = "thumbtune-learner"
BASE_VERSION = "v0"
"""The version name of the empty (zero-initialised) adapter every deployment starts from."""
ADAPTER_OFF = "base"
"""``FeedbackEvent.adapter_version`` of an answer served with the adapter switched off: the base model,
which is what the empty adapter v0 computes too."""

# --- the adapter store: one immutable directory ``v<N>/`` per version ------------------------------
MANIFEST = "manifest.json"
"""`AdapterManifest` of the version, written last (a directory without it is not a version yet)."""
ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""The LoRA weights, standard PEFT layout (``PeftModel.from_pretrained`` and vLLM read it as is)."""
ADAPTER_CONFIG = "adapter_config.json"
"""The PEFT ``LoraConfig`` of the weights."""
VALUE_HEAD_WEIGHTS = "value_head.safetensors"
"""The learner's critic; servers do not read it."""
LEARNER_STATE = "learner_state.pt"
"""Optimizer, KL controller and statistics a resumed learner continues from; servers do not read it."""
REWARD_MODEL_WEIGHTS = "reward_model.safetensors"
"""The reward model the learner had fitted when it wrote the version (its heads and feature scaling)."""


Engine = Literal["embedded", "vllm"]
"""What generated an answer (``FeedbackEvent.engine``).

embedded  thumbtune's own engine: behaviour_logprobs are exactly the log-probs defined above.
vllm      a vLLM server run with ``--logprobs-mode processed_logprobs``: log_softmax(z / T) after top-k/top-p,
          from vLLM's forward pass. At top_p = 1 the same quantity as above, up to numerics
          (docs/BENCHMARKS.md measures |log pi_vllm - log pi_learner|; truncated importance weights absorb
          it); at top_p < 1 the log-prob of the truncated, renormalised distribution the token was drawn
          from, which is >= the above (so pi_old / pi_b is smaller: those samples weigh a little less, never
          more)."""


class FeedbackKind(str, Enum):
    thumb = "thumb"
    rating = "rating"
    choice = "choice"
    ranking = "ranking"


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


MIN_TEMPERATURE = 1e-3
"""The smallest temperature sampled at: below it z / T overflows float32 (5e-324 did), and sampling at 1e-3 is
already greedy in all but exact ties. A request's smaller positive temperature samples (and records) at it."""


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)

    @property
    def logprob_temperature(self) -> float:
        """The T of the recorded log-probs: the request's temperature (at least `MIN_TEMPERATURE`), 1 for
        greedy."""
        return max(self.temperature, MIN_TEMPERATURE) if self.temperature > 0 else 1.0


def check_aligned(response_token_ids: list[int], behaviour_logprobs: list[float]) -> None:
    """One behaviour log-prob per response token, or ValueError."""
    if len(response_token_ids) != len(behaviour_logprobs):
        raise ValueError(f"{len(response_token_ids)} response tokens but {len(behaviour_logprobs)} log-probs")


def reward_for(kind: FeedbackKind, value: str | int, ranking_size: int | None = None) -> float:
    """Map a user's feedback to a scalar reward in [-1, 1].

    thumb: up -> +1, down -> -1; rating r in 1..5 -> (r - 3) / 2;
    choice: the chosen answer -> +1, the rejected one -> -1;
    ranking: the answer in place k of K (1 = best) -> 1 - 2 (k - 1) / (K - 1), linear from +1 to -1
    (K = 2 is a choice).
    """
    if kind is FeedbackKind.thumb:
        return {"up": 1.0, "down": -1.0}[str(value)]
    if kind is FeedbackKind.rating:
        return (int(value) - 3) / 2
    if kind is FeedbackKind.ranking:
        if ranking_size is None or not 2 <= ranking_size or not 1 <= int(value) <= ranking_size:
            raise ValueError(f"a ranking's place must be 1..K with K >= 2, got {value} of {ranking_size}")
        return 1 - 2 * (int(value) - 1) / (ranking_size - 1)
    return {"chosen": 1.0, "rejected": -1.0}[str(value)]


OPTIONAL_FIELDS = ("ranking_id", "ranking_size", "user", "engine")
"""`FeedbackEvent` fields left out of the JSON when they are None (a ranking's fields on other kinds, the
``user`` of a request that sent none), so events without them stay as they were before these fields existed
and learners that predate them still read thumbs, ratings and choices."""


class FeedbackEvent(BaseModel):
    """One rated answer: what the learner needs to treat it as a (prompt, response, reward) sample.

    Key on Kafka: ``response_id``. ``event_id`` is unique per rated answer and stable
    across producer retries, so consumers deduplicate on it.
    """

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str
    response_id: str
    completion_id: str = Field(description="The chat.completion id; the choices of one request share it.")
    api_key_id: str | None = Field(
        description="sha256 prefix of the API key that got (and rated) the answer; None without auth."
    )
    user: str | None = Field(
        default=None,
        max_length=256,
        description="The chat request's ``user`` field, as the client sent it (unverified). The learner "
        "counts it as the rater only when told to trust it (THUMBTUNE_LEARNER_RATER_IDENTITY=user).",
    )
    answered_at: float
    rated_at: float
    base_model: str
    base_fingerprint: str
    adapter_version: str = Field(
        description="Adapter version that answered; 'base' when the adapter was off."
    )
    messages: list[Message]
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    behaviour_logprobs: list[float]
    sampling: SamplingParams
    finish_reason: Literal["stop", "length"]
    kind: FeedbackKind
    value: str | int
    reward: float = Field(ge=-1.0, le=1.0)
    comment: str | None = None
    paired_response_id: str | None = Field(
        default=None,
        description="For choice feedback: on a rejected answer, the chosen one; on the chosen answer, the "
        "rejected one (None when it was chosen as the best of several).",
    )
    ranking_id: str | None = Field(
        default=None,
        description="For ranking feedback: shared by the events of one ranking. Its answers' places (value: "
        "1 = best) give every pair: the answer in place i is preferred to each in a later place.",
    )
    ranking_size: int | None = Field(
        default=None, ge=2, description="For ranking feedback: how many answers the ranking ordered (K)."
    )
    engine: Engine | None = Field(
        default=None,
        description="What generated the answer and measured its behaviour_logprobs (`Engine`); None in "
        "events from before the field existed: the embedded engine.",
    )

    @model_validator(mode="after")
    def _aligned(self) -> FeedbackEvent:
        check_aligned(self.response_token_ids, self.behaviour_logprobs)
        ranked = self.kind is FeedbackKind.ranking
        if ranked != (self.ranking_id is not None) or ranked != (self.ranking_size is not None):
            raise ValueError("ranking_id and ranking_size are given for ranking feedback, and only for it")
        if ranked and not (isinstance(self.value, int) and 1 <= self.value <= self.ranking_size):
            raise ValueError(
                f"a ranking's value is the answer's place 1..{self.ranking_size}, not {self.value!r}"
            )
        return self

    def key(self) -> bytes:
        return self.response_id.encode()

    def to_bytes(self) -> bytes:
        absent = {name for name in OPTIONAL_FIELDS if getattr(self, name) is None}
        return self.model_dump_json(exclude=absent).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> FeedbackEvent:
        return cls.model_validate_json(data)


class AdapterAnnouncement(BaseModel):
    """Published on ``thumbtune.adapters`` once a version is durable in the adapter store.

    Servers find the version in the adapter store they are configured with, by its name. Fields this
    schema does not know are ignored, so a server reads announcements from older and newer learners
    alike (learners before this schema also sent a ``uri`` nobody read).
    """

    model_config = ConfigDict(extra="ignore")

    schema_version: Literal[1] = SCHEMA_VERSION
    version: str
    parent: str | None
    sha256: dict[str, str] = Field(description="File name -> sha256 of every file in the version.")
    base_model: str
    base_fingerprint: str
    created_at: float
    event_count: int
    stats: dict[str, float] = Field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> AdapterAnnouncement:
        return cls.model_validate_json(data)


class AdapterManifest(BaseModel):
    """`MANIFEST` inside every adapter version directory ``v<N>/``."""

    model_config = ConfigDict(extra="allow")

    schema_version: Literal[1] = SCHEMA_VERSION
    version: str
    parent: str | None
    base_model: str
    base_fingerprint: str
    created_at: float
    event_count: int
    offsets: dict[str, int] = Field(
        default_factory=dict, description="'topic:partition' -> next offset to consume after this version."
    )
    event_ids: list[str] = Field(
        default_factory=list, description="Ids of the events this version trained on."
    )
    diagnostics: dict[str, float] = Field(default_factory=dict)
    sha256: dict[str, str] = Field(default_factory=dict)


class ControlAction(str, Enum):
    pin = "pin"
    """Make ``version`` live on every replica and keep it there until unpin, rollback or refuse."""
    unpin = "unpin"
    """Follow the newest good version again."""
    rollback = "rollback"
    """Pin ``version``, the newest good version below ``previous`` (resolved by the replica that took the
    call, so every replica goes to the same one)."""
    refuse = "refuse"
    """``version`` never serves again (``reason``); where it is live, serving steps down to the newest good
    version below it. Sent by operators, by a replica whose admission checks refused the version, and by the
    canary judge when a canary is worse than live (``reason``: the test's figures)."""
    canary = "canary"
    """``version``, newer than live and past its checks, answers a share of the traffic beside live until
    it is promoted or refused; it replaces an earlier canary."""
    promote = "promote"
    """The canary ``version`` becomes live (``reason``: the test's figures)."""


class ControlRecord(BaseModel):
    """A decision on `CONTROL_TOPIC`: applied, in log order, by every replica (key: ``record_id``).

    The log is the cluster's state: folding every record from the start gives each replica the same
    pinned version and the same refused versions, whatever it saw before.
    """

    model_config = ConfigDict(extra="ignore")

    type: Literal["decision"] = "decision"
    schema_version: Literal[1] = SCHEMA_VERSION
    record_id: str
    action: ControlAction
    version: str | None = Field(default=None, description="The version acted on; None for unpin.")
    previous: str | None = Field(
        default=None, description="The live version where the decision was taken (rollback: rolled back)."
    )
    reason: str | None = Field(
        default=None, max_length=2000, description="Why (refuse: shown as its message)."
    )
    check: str | None = Field(
        default=None, description="For a refusal by actor 'checks': the check it failed."
    )
    actor: str = Field(
        description="Who decided: 'admin' (an operator), 'checks' (a replica's admission checks refused it) "
        "or 'canary' (the canary stage: a new candidate, or the judge's promotion or refusal)."
    )
    replica: str = Field(description="The replica that published the record.")
    issued_at: float

    @model_validator(mode="after")
    def _version_given(self) -> ControlRecord:
        if (self.version is None) != (self.action is ControlAction.unpin):
            raise ValueError(f"a {self.action.value} record names a version, and only unpin names none")
        if self.version is not None:
            version_number(self.version)
        return self


class ControlAck(BaseModel):
    """A replica's receipt of a `ControlRecord` (or, with ``record_id`` None, its arrival or departure)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["ack"] = "ack"
    schema_version: Literal[1] = SCHEMA_VERSION
    record_id: str | None = Field(description="The decision applied; None: a replica joined or left.")
    replica: str
    applied: bool = Field(description="Applied as decided; False: ``error`` says why not.")
    live: str = Field(description="The replica's live version after applying it.")
    canary: str | None = Field(default=None, description="The replica's canary then, if it has one.")
    error: str | None = None
    leaving: bool = Field(default=False, description="The replica is shutting down.")
    at: float


def parse_control(data: bytes) -> ControlRecord | ControlAck:
    """A record of `CONTROL_TOPIC`; ValueError if it is neither kind."""
    raw = json.loads(data)
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "decision":
        return ControlRecord.model_validate(raw)
    if kind == "ack":
        return ControlAck.model_validate(raw)
    raise ValueError(f"not a control record (type {kind!r})")


def version_number(version: str) -> int:
    """'v12' -> 12. Raises ValueError for anything that is not a version name."""
    if not (version.startswith("v") and version[1:].isdigit()):
        raise ValueError(f"not an adapter version name: {version!r} (expected v<N>)")
    return int(version[1:])


def dumps(obj: BaseModel) -> str:
    return json.dumps(obj.model_dump(mode="json"), indent=2, sort_keys=True)
