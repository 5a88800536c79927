"""POST /v1/feedback: thumbs, 1-5 ratings and choices between two answers."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from service.auth import api_key_id, rate_limited
from service.dependencies import get_feedback
from service.errors import documented
from service.protocol import FeedbackAccepted, FeedbackRequest
from service.serving_feedback import FeedbackService

router = APIRouter()


@router.post(
    "/v1/feedback",
    response_model=FeedbackAccepted,
    status_code=202,
    dependencies=[Depends(rate_limited("feedback"))],
    responses={
        200: {"model": FeedbackAccepted, "description": "The same rating again: nothing new (duplicate)."},
        **documented(400, 401, 404, 409, 413, 429, 503),
    },
)
def feedback(
    body: FeedbackRequest,
    key_id: str | None = Depends(api_key_id),
    service: FeedbackService = Depends(get_feedback),
) -> JSONResponse:
    accepted, status = service.submit(body, key_id)
    return JSONResponse(accepted.model_dump(), status_code=status)
