"""`edgerag serve`'s OpenAI-compatible layer: POST /v1/chat/completions in OpenAI's chat format
(streaming chunks too), and GET /v1/models. The last user message is the question; the passages and
the answer's citations come back in extra fields, `passages`, `citations`, `supported`, `abstained` and
`confidence` (the last chunk of a stream carries them). An abstention is an empty message."""

from __future__ import annotations

import threading
import time
import uuid
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from edgerag.runtime.http_answers import AnswerService, ApiError, error_event, request_field, sse
from edgerag.runtime.pipeline import Answer


def user_content(message: dict):
    """A user message's content: its text, or its text parts joined."""
    content = message.get("content")
    if isinstance(content, list):  # content parts: the text ones, joined
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if not all(isinstance(p, dict) for p in content) or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "invalid_request", "content parts must be objects, their text strings")
        content = "".join(texts)
    return content


def last_user_content(data: dict):
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "invalid_request", "messages must be a non-empty list")
    for message in reversed(messages):
        if not isinstance(message, dict):
            raise ApiError(400, "invalid_request", "each message must be an object")
        if message.get("role") == "user":
            return user_content(message)
    raise ApiError(400, "invalid_request", "no message with role 'user'")


def finish_reason(a: Answer) -> str:
    return "length" if a.stop_reason in ("length", "deadline", "cancelled") else "stop"


def completion(base: dict, a: Answer) -> dict:
    """The whole answer as a chat.completion object."""
    return {**base, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": a.answer},
                         "finish_reason": finish_reason(a)}],
            "usage": {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.new_tokens,
                      "total_tokens": a.prompt_tokens + a.new_tokens},
            **trust(a), "timings": a.to_record()["timings"]}


def trust(a: Answer) -> dict:
    """The extra fields: what the answer stands on, and whether the bundle abstained."""
    return {"passages": a.passages, "citations": a.citations, "supported": a.supported, "abstained": a.abstained,
            "confidence": a.confidence}


def chunk(base: dict, delta: dict, reason=None, **extra) -> str:
    return sse({**base, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}], **extra})


async def chunk_events(base: dict, pieces: AsyncIterator, cancel: threading.Event) -> AsyncIterator[str]:
    try:
        yield chunk(base, {"role": "assistant", "content": ""})
        async for kind, value in pieces:
            if kind == "piece":
                yield chunk(base, {"content": value})
            elif kind == "answer":
                yield chunk(base, {}, finish_reason(value), **trust(value))
            else:
                yield error_event(value)
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()


class ChatCompletions:
    """POST /v1/chat/completions over an AnswerService."""

    def __init__(self, service: AnswerService):
        self.service = service

    async def models(self, request: Request) -> JSONResponse:
        """GET /v1/models: the one served bundle, as OpenAI's model list (clients that list models first can start)."""
        service = self.service
        service.authorize(request)
        return JSONResponse({"object": "list", "data": [{"id": service.model_name, "object": "model",
                                                         "created": service.pipeline.manifest.created_unix,
                                                         "owned_by": "edgerag"}]})

    async def endpoint(self, request: Request):
        service, opts = self.service, self.service.opts
        service.authorize(request)
        data = await service.read_json(request)
        question = service.question_of(last_user_content(data))
        max_new = request_field(data, "max_completion_tokens", int, None, 1, opts.max_new_tokens) or \
            request_field(data, "max_tokens", int, None, 1, opts.max_new_tokens)
        k = request_field(data, "k", int, None, 1, opts.max_k)
        stream = request_field(data, "stream", bool, False)
        deadline = time.monotonic() + opts.timeout_s
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": completion_id, "created": created, "model": service.model_name}
        if not stream:
            return JSONResponse(completion(base, await service.answer(question, k, max_new, deadline)))
        cancel = threading.Event()
        pieces = await service.start(question, k, max_new, deadline, cancel)
        return StreamingResponse(chunk_events(base, pieces, cancel), media_type="text/event-stream")
