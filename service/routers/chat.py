"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse

from service.auth import api_key_id, rate_limited
from service.dependencies import get_chat
from service.errors import documented
from service.protocol import ChatCompletion, ChatCompletionRequest
from service.serving_chat import ChatService

router = APIRouter()

ADAPTER_HEADER = "x-thumbtune-adapter-version"


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    dependencies=[Depends(rate_limited("chat"))],
    responses={
        200: {
            "description": "The completion; with stream=true, server-sent events of chat.completion.chunk "
            "objects, ended by 'data: [DONE]'.",
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "description": "One server-sent event.",
                        "required": ["data"],
                        "properties": {
                            "data": {
                                "type": "string",
                                "description": "A chat.completion.chunk as JSON, or [DONE] after the last.",
                            }
                        },
                    }
                }
            },
        },
        **documented(400, 401, 404, 413, 429, 503),
    },
)
async def chat_completions(
    body: ChatCompletionRequest,
    key_id: str | None = Depends(api_key_id),
    service: ChatService = Depends(get_chat),
) -> JSONResponse | StreamingResponse:
    prepared = service.prepare(body, key_id)
    headers = {ADAPTER_HEADER: prepared.adapter, "x-thumbtune-response-ids": ",".join(prepared.response_ids)}
    if body.stream:
        # submitted before the response starts, so a refusal (the engine stopping) is still a 503
        running = service.start(prepared)
        headers |= {"cache-control": "no-cache", "x-accel-buffering": "no"}
        return StreamingResponse(
            service.stream(body, prepared, running), media_type="text/event-stream", headers=headers
        )
    completion = await service.complete(body, prepared)
    return JSONResponse(completion.model_dump(), headers=headers)
