"""Which feedback events the learner trains on: parsing, validation, staleness, skip accounting.

A malformed event is skipped with a reason and counted, never raised: one bad producer must not
stop the learner. A reason is ``"<code>: <detail>"``; the code (`reason_code`) is what gets
counted (the manifest's ``skipped.<code>`` diagnostics, the metrics), the detail is what gets logged.

Staleness is counted in versions. An event served by ``v<k>`` while the learner's weights are
``v<n>`` is ``n - k`` versions stale; ``base`` (adapter off) is the reference policy, which is
what v0 computes, so it counts as v0. Events more than ``max_staleness`` versions stale are
dropped: the truncated importance weights (learner/ppo.py) already damp the stale ones, but an
event sampled many versions ago mostly carries tokens the policy has moved away from, so it adds
bias and little signal. Except the ratings of a version the cluster still serves, live or canary
(``serving``, from the replicas' receipts on thumbtune.control: learner/control.py `Serving`): they are
what users are given now, and while canaries hold the live version back (service/canary/judge.py) they
are most of the ratings there are. Dropping them would leave the learner little to learn from; their
importance weights, truncated, stay.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter

from pydantic import ValidationError

from thumbtune.core.contract import ADAPTER_OFF, BASE_VERSION, FeedbackEvent, version_number

log = logging.getLogger(__name__)


def reason_code(reason: str) -> str:
    """'token_out_of_vocab: ...' -> 'token_out_of_vocab'."""
    return reason.split(":", 1)[0]


def parse_event(raw: bytes | str) -> tuple[FeedbackEvent | None, str | None]:
    """(event, None) for a valid FeedbackEvent JSON, else (None, reason)."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"not_json: {exc}"
    try:
        return FeedbackEvent.model_validate(data), None
    except ValidationError as exc:
        first = exc.errors()[0]
        detail = f"{first.get('loc', ())}: {first.get('msg', '')}" + (
            f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        )
        code = "logprob_count" if "log-probs" in str(first.get("msg", "")) else "schema"
        return None, f"{code}: {detail}"


def served_version_number(adapter_version: str) -> int:
    """'v3' -> 3; 'base' (adapter off) -> 0, since the empty adapter v0 computes the base model."""
    return version_number(BASE_VERSION if adapter_version == ADAPTER_OFF else adapter_version)


def validate_event(
    event: FeedbackEvent, vocab_size: int, fingerprint: str, max_length: int | None = None
) -> str | None:
    """None if the learner can train on ``event``, else the reason it cannot."""
    if event.base_fingerprint != fingerprint:
        return (
            f"fingerprint: event was served by base {event.base_model} with fingerprint "
            f"{event.base_fingerprint}, the learner's is {fingerprint}"
        )
    if len(event.response_token_ids) != len(event.behaviour_logprobs):
        return (
            f"logprob_count: {len(event.response_token_ids)} response tokens, "
            f"{len(event.behaviour_logprobs)} behaviour log-probs"
        )
    if not event.prompt_token_ids:
        return "empty_prompt: no prompt tokens, nothing conditions the first response token"
    if not event.response_token_ids:
        return "empty_response: no response tokens to credit the reward to"
    bad = [t for t in event.prompt_token_ids + event.response_token_ids if not 0 <= t < vocab_size]
    if bad:
        return f"token_out_of_vocab: token id {bad[0]} outside [0, {vocab_size}) ({len(bad)} such)"
    if not all(math.isfinite(lp) and lp <= 1e-4 for lp in event.behaviour_logprobs):
        return "bad_logprob: behaviour log-probs must be finite and <= 0"
    if not math.isfinite(event.reward):
        return "schema: reward is not finite"
    length = len(event.prompt_token_ids) + len(event.response_token_ids)
    if max_length is not None and length > max_length:
        return f"too_long: {length} tokens, the model takes {max_length}"
    try:
        served_version_number(event.adapter_version)
    except ValueError:
        return f"bad_adapter_version: {event.adapter_version!r} is neither 'base' nor v<N>"
    return None


def staleness(event: FeedbackEvent, current_version: str) -> int:
    """How many versions the learner's weights (``current_version``) are past the one that served it."""
    return version_number(current_version) - served_version_number(event.adapter_version)


def is_stale(
    event: FeedbackEvent, current_version: str, max_staleness: int, serving: frozenset[str] = frozenset()
) -> bool:
    """``event`` is more than ``max_staleness`` versions behind ``current_version`` and was served by none
    of the versions in ``serving`` (those some replica still serves, live or canary: never stale)."""
    still_serving = served_version_number(event.adapter_version) in {version_number(v) for v in serving}
    return staleness(event, current_version) > max_staleness and not still_serving


def stale_reason(
    event: FeedbackEvent, current_version: str, max_staleness: int, serving: frozenset[str] = frozenset()
) -> str | None:
    """None if ``event`` is fine to train ``current_version`` on, else the reason to drop it: stale
    (`is_stale`), or served by a version the learner has not written yet."""
    lag = staleness(event, current_version)
    if is_stale(event, current_version, max_staleness, serving):
        return (
            f"stale: served by {event.adapter_version}, {lag} versions behind {current_version} "
            f"(max_staleness {max_staleness})"
        )
    if lag < 0:
        return (
            f"future_version: served by {event.adapter_version} but the learner is at {current_version}; "
            "is this the adapter store the server used?"
        )
    return None


class SkipCounter:
    """Counts skipped events by reason code and logs each one (what, why, where from)."""

    def __init__(self) -> None:
        self.total: Counter[str] = Counter()
        self._since_drain: Counter[str] = Counter()

    def add(self, reason: str, where: str) -> None:
        code = reason_code(reason)
        self.total[code] += 1
        self._since_drain[code] += 1
        log.warning("skipping event %s: %s", where, reason)

    def drain(self) -> dict[str, int]:
        """Counts since the previous drain (what one version's manifest reports), then reset them."""
        counts, self._since_drain = dict(self._since_drain), Counter()
        return counts
