"""Ratings -> feedback events on thumbtune.feedback: a thumb or a 1-5 rating of one answer, a choice between
two answers to one prompt, or a ranking of all the answers of one request (best first).

One rating per answer per API key (a choice and a ranking rate each of their answers): the store's
``claim_rating`` makes a repeat idempotent (same answers, same event ids, nothing published twice) across
replicas. Event ids are derived from (response id, key id), so even a retried publish carries the same id
and the learner deduplicates on it.
"""

from __future__ import annotations

import hashlib
import json
import time

from service import metrics
from service.errors import APIError
from service.protocol import FeedbackAccepted, FeedbackRequest
from service.publisher import EventTooLarge, SpoolFull
from service.runtime import Runtime
from service.store import StoredCompletion
from thumbtune.core.contract import FEEDBACK_TOPIC, FeedbackEvent, FeedbackKind


def _rating_key(response_id: str, key_id: str | None) -> str:
    return f"{response_id}|{key_id or '-'}"


def event_id_for(response_id: str, key_id: str | None) -> str:
    return hashlib.sha256(_rating_key(response_id, key_id).encode()).hexdigest()[:32]


class FeedbackService:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def _lookup(self, response_id: str, key_id: str | None, param: str) -> StoredCompletion:
        rec = self.rt.store.get(response_id)
        # Another key's answer looks exactly like an unknown one: no oracle for other users' ids.
        if rec is None or rec.api_key_id != key_id:
            raise APIError(
                404,
                f"no answer with id {response_id!r} to rate: unknown, expired, or not yours",
                param=param,
                code="response_not_found",
            )
        return rec

    def submit(self, req: FeedbackRequest, key_id: str | None) -> tuple[FeedbackAccepted, int]:
        """Returns the body and the status: 202 for a new rating, 200 for an idempotent repeat."""
        now = time.time()
        if req.response_id is not None:
            events = self._single(req, key_id, now)
        elif req.ranking is not None:
            events = self._ranking(req, key_id, now)
        else:
            events = self._choice(req, key_id, now)
        return self._claim_and_publish(events, key_id)

    def _single(self, req: FeedbackRequest, key_id: str | None, now: float) -> list[FeedbackEvent]:
        rec = self._lookup(req.response_id, key_id, "response_id")
        kind, value = (FeedbackKind.thumb, req.thumb) if req.thumb else (FeedbackKind.rating, req.rating)
        event_id = event_id_for(rec.response_id, key_id)
        return [rec.to_event(event_id=event_id, rated_at=now, kind=kind, value=value, comment=req.comment)]

    def _choice(self, req: FeedbackRequest, key_id: str | None, now: float) -> list[FeedbackEvent]:
        """The chosen answer (+1) over one other, or the best of several (each other -1); a rejected answer's
        event names the chosen one, the chosen one's names the rejected one when there is only one."""
        chosen = self._lookup(req.chosen, key_id, "chosen")
        rejected = [self._lookup(rid, key_id, "rejected") for rid in req.rejected_ids]
        if any(r.prompt_token_ids != chosen.prompt_token_ids for r in rejected):
            raise APIError(
                400,
                "chosen and rejected must be answers to the same prompt",
                param="rejected",
                code="not_a_pair",
            )
        only = rejected[0].response_id if len(rejected) == 1 else None
        rated = [(chosen, "chosen", only)] + [(r, "rejected", chosen.response_id) for r in rejected]
        return [
            a.to_event(
                event_id=event_id_for(a.response_id, key_id),
                rated_at=now,
                kind=FeedbackKind.choice,
                value=v,
                comment=req.comment,
                paired_response_id=paired,
            )
            for a, v, paired in rated
        ]

    def _ranking(self, req: FeedbackRequest, key_id: str | None, now: float) -> list[FeedbackEvent]:
        """The answers of one request, best first: place k of K gets 1 - 2 (k - 1) / (K - 1)."""
        answers = [self._lookup(rid, key_id, "ranking") for rid in req.ranking]
        requests = {a.completion_id for a in answers}
        if len(requests) != 1:
            raise APIError(
                400,
                "a ranking orders the answers of one request (one chat completion with n = 2 to 4)",
                param="ranking",
                code="not_one_request",
            )
        asked = answers[0].n
        if asked is not None and asked != len(answers):
            raise APIError(
                400,
                f"rank all {asked} answers of the request, best first: the ranking names {len(answers)}",
                param="ranking",
                code="incomplete_ranking",
            )
        ranking_id = "ranking-" + event_id_for(answers[0].completion_id, key_id)[:24]
        return [
            a.to_event(
                event_id=event_id_for(a.response_id, key_id),
                rated_at=now,
                kind=FeedbackKind.ranking,
                value=place,
                comment=req.comment,
                ranking_id=ranking_id,
                ranking_size=len(answers),
            )
            for place, a in enumerate(answers, 1)
        ]

    def _claim_and_publish(
        self, events: list[FeedbackEvent], key_id: str | None
    ) -> tuple[FeedbackAccepted, int]:
        store = self.rt.store
        encoded = [(ev.key(), ev.to_bytes()) for ev in events]
        try:
            for key, value in encoded:  # before anything is claimed or spooled
                self.rt.publisher.check(key, value)
        except EventTooLarge as exc:
            raise APIError(
                413,
                f"this rating cannot be delivered: {exc}. The answer it rates (its conversation and "
                "tokens) is too long for the feedback topic",
                code="event_too_large",
            ) from exc
        claimed: list[str] = []
        for ev in events:
            key = _rating_key(ev.response_id, key_id)
            payload = json.dumps(
                {
                    "event_id": ev.event_id,
                    "kind": ev.kind.value,
                    "value": ev.value,
                    "pair": ev.paired_response_id or ev.ranking_id,
                }
            )
            earlier = store.claim_rating(key, payload)
            if earlier is None:
                claimed.append(key)
                continue
            for k in claimed:
                store.release_rating(k)
            first = json.loads(earlier)
            same = (
                first["kind"] == ev.kind.value
                and first["value"] == ev.value
                and first["pair"] == (ev.paired_response_id or ev.ranking_id)
            )
            if same and not claimed:
                metrics.FEEDBACK_DUPLICATES.inc()
                return FeedbackAccepted(status="duplicate", event_ids=[e.event_id for e in events]), 200
            raise APIError(
                409,
                f"answer {ev.response_id!r} was already rated ({first['kind']}: {first['value']}); "
                "a rating is final",
                code="already_rated",
            )
        try:
            for key, value in encoded:
                self.rt.publisher.publish(FEEDBACK_TOPIC, key, value)
        except SpoolFull as exc:
            for k in claimed:
                store.release_rating(k)
            raise APIError(
                503,
                "feedback is queued faster than Kafka takes it; try again later",
                code="feedback_backlog",
                headers={"Retry-After": str(exc.retry_after_s)},
            ) from exc
        for ev in events:
            metrics.FEEDBACK.labels(ev.kind.value, str(ev.value), ev.adapter_version).inc()
            metrics.FEEDBACK_REWARD.labels(ev.adapter_version).inc(ev.reward)
            metrics.APPROVALS.record(ev.adapter_version, ev.reward)
            if ev.reward > 0:
                metrics.FEEDBACK_APPROVALS.labels(ev.adapter_version).inc()
        return FeedbackAccepted(status="accepted", event_ids=[e.event_id for e in events]), 202
