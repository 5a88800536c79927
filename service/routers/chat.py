"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from service.auth import api_key_id
from service.protocol import ChatCompletion, ChatCompletionRequest
from service.serving_chat import ChatService

router = APIRouter()

ADAPTER_HEADER = "x-thumbtune-adapter-version"


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, key_id: str | None = Depends(api_key_id)
) -> JSONResponse | StreamingResponse:
    service: ChatService = request.app.state.chat
    prepared = service.prepare(body, key_id)
    headers = {ADAPTER_HEADER: prepared.adapter, "x-thumbtune-response-ids": ",".join(prepared.response_ids)}
    if body.stream:
        headers |= {"cache-control": "no-cache", "x-accel-buffering": "no"}
        return StreamingResponse(
            service.stream(body, prepared), media_type="text/event-stream", headers=headers
        )
    completion = await service.complete(body, prepared)
    return JSONResponse(completion.model_dump(), headers=headers)
