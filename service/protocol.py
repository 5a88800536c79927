"""OpenAI-compatible request and response models, thumbtune's feedback API and the error body. Models only.

Every limit that does not depend on settings is declared on the field, so bad input is refused by validation
with a message naming the field, and the OpenAPI schema says exactly what the server accepts: a request the
schema allows is refused only by a settings-dependent limit, checked in service.serving_chat and named in the
field's description (max_tokens over THUMBTUNE_MAX_TOKENS_CAP, more than THUMBTUNE_MAX_MESSAGES messages, the
context window), or by the state of the server (an unknown model or answer id, a rating already given).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty or only whitespace")
    return text


NonBlank = Annotated[str, AfterValidator(_not_blank), WithJsonSchema({"type": "string", "pattern": r"\S"})]
"""Text with at least one character that is not whitespace (the schema's pattern says the same)."""


class TextPart(BaseModel):
    type: Literal["text"]
    text: NonBlank


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: NonBlank | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"] = Field(default="text", description="Only plain text is supported.")


def _no_tools(tools: list) -> list:
    if tools:
        raise ValueError("tools are not supported by this server")
    return tools


StopSequence = Annotated[str, Field(min_length=1, max_length=64)]
StopSequences = Annotated[list[StopSequence], Field(max_length=4)]


def _as_list(stop: object) -> object:
    return [stop] if isinstance(stop, str) else stop


Stop = Annotated[
    StopSequences, BeforeValidator(_as_list, json_schema_input_type=StopSequence | StopSequences)
]
"""One stop sequence or up to 4, validated as a list (so an error names ``stop``, not a branch of a union)."""


class ChatCompletionRequest(BaseModel):
    # Unknown OpenAI parameters are ignored, as many servers do; the ones that would change
    # the meaning of the answer if ignored are refused by their declared limits.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(
        min_length=1,
        max_length=128,
        description="'thumbtune' (the live adapter), 'base' (adapter off) or a loaded version "
        "'thumbtune@v<N>' (GET /v1/models); anything else is a 404 model_not_found.",
    )
    messages: list[ChatMessage] = Field(
        min_length=1, description="At most THUMBTUNE_MAX_MESSAGES (64; 400 too_many_messages above)."
    )
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="At most THUMBTUNE_MAX_TOKENS_CAP (1024; 400 max_tokens_too_large above), and the "
        "prompt plus this within the context window (400 context_length_exceeded).",
    )
    max_completion_tokens: int | None = Field(default=None, ge=1, description="As max_tokens, and wins.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=4)
    # 2^53 - 1: the largest integer a JSON number holds exactly (the schema's maximum is a float)
    seed: int | None = Field(default=None, ge=0, le=2**53 - 1)
    stop: Stop | None = Field(
        default=None, validate_default=True, description="Up to 4 sequences, each 1 to 64 characters."
    )
    user: str | None = Field(default=None, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=0, description="Only 0 is supported.")
    tools: Annotated[list, AfterValidator(_no_tools), Field(max_length=0)] | None = Field(
        default=None, description="Not supported: leave it out (or empty)."
    )
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: list[str] | None) -> list[str]:
        return list(v or [])


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
FEEDBACK_FORMS = {
    "thumb": ("response_id", "thumb"),
    "rating": ("response_id", "rating"),
    "choice": ("chosen", "rejected"),
    "ranking": ("ranking",),
}
"""The four kinds of rating and the fields each one requires (``comment`` goes with any)."""


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A field's schema without its null alternative (and default): the form that requires it."""
    alternatives = [s for s in schema.get("anyOf", []) if s.get("type") != "null"]
    rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
    return rest | (
        alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives} if alternatives else {}
    )


def _one_of_the_forms(schema: dict[str, Any]) -> None:
    """The schema of `FeedbackRequest` as `_one_form` validates it: exactly one of `FEEDBACK_FORMS`, built
    from the fields' own schemas (one home for every limit)."""
    properties = schema.pop("properties")
    schema.pop("required", None)
    schema.pop("additionalProperties", None)
    schema["oneOf"] = [
        {
            "type": "object",
            "title": f"{kind} feedback",
            "properties": {f: _not_null(properties[f]) for f in fields} | {"comment": properties["comment"]},
            "required": list(fields),
            "additionalProperties": False,
        }
        for kind, fields in FEEDBACK_FORMS.items()
    ]


class FeedbackRequest(BaseModel):
    """One of {response_id, thumb}, {response_id, rating}, {chosen, rejected}, {ranking}; a comment. The
    answers rated must be ones this API key was given (else 404 response_not_found), each rated once (409
    already_rated); a choice's and a ranking's answers answer one request (400 not_a_pair, not_one_request),
    and a ranking orders all of them (400 incomplete_ranking)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_of_the_forms)

    response_id: ResponseId | None = None
    thumb: Literal["up", "down"] | None = None
    rating: int | None = Field(default=None, ge=1, le=5)
    chosen: ResponseId | None = None
    rejected: ResponseId | Annotated[list[ResponseId], Field(min_length=1, max_length=3)] | None = Field(
        default=None,
        description="The other answer, or (best of up to 4 answers to one prompt) the 1 to 3 others; each "
        "named once, and not the chosen one.",
        json_schema_extra={"uniqueItems": True},
    )
    ranking: list[ResponseId] | None = Field(
        default=None,
        min_length=2,
        max_length=4,
        description="All the answers of one request (n = 2 to 4), best first, each named once.",
        json_schema_extra={"uniqueItems": True},
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


class ErrorDetail(BaseModel):
    message: str = Field(description="What was wrong, and what to do about it.")
    type: str = Field(description="OpenAI's error type, e.g. invalid_request_error.")
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str | None = Field(description="A stable machine-readable code, e.g. max_tokens_too_large.")


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail
