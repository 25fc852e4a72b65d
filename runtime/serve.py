"""`edgerag serve BUNDLE`: one bundle over HTTP, for the other programs on a device.

    POST /v1/ask               {"question", "k"?, "max_new_tokens"?, "stream"?} -> the answer record,
                               or server-sent events: `token` events, then one `answer` event
    POST /v1/chat/completions  OpenAI's chat format (streaming chunks too); the last user message is
                               the question, the passages and citations come back in extra fields
    GET  /v1/models            the served bundle, as OpenAI's model list
    POST /v1/reload            answer from the bundle's documents as they are on disk now (after
                               `edgerag add`, `remove` or `sync`), without a restart
    GET  /health, GET /v1/info

Starlette on uvicorn: a small, well-kept ASGI stack (routing, streaming responses, a production
server) that pulls in no torch, installed with `pip install 'edgerag[serve]'`.

Answers are computed in threads, at most `concurrency` at a time (on a small CPU one answer already
uses every core); up to `max_queue` more wait, and further requests get 503 with Retry-After at
once. Every request has a deadline: one that waits past it gets 503, one whose answer runs past it
is cut (stop_reason "deadline"); an answer whose client went away stops at its next token. Errors are JSON, `{"error": {"type", "message"}}`, and never stop
the server. The Pipeline is shared by the threads (see Pipeline.load): answers are those of a
sequential run.

This module holds edgerag's own routes and the server; the OpenAI-compatible route is in
runtime.openai_api, and what both share (options, admission, a request's answer) in runtime.http_answers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
from pathlib import Path
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from edgerag.runtime.http_answers import AnswerService, ApiError, ServeOptions, error_event, error_response, sse
from edgerag.runtime.openai_api import ChatCompletions
from edgerag.runtime.pipeline import Pipeline
from edgerag.runtime.prompt import PromptError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def answer_events(pieces: AsyncIterator, cancel: threading.Event) -> AsyncIterator[str]:
    """/v1/ask's server-sent events: `token` events, then one `answer` (or `error`) event."""
    try:
        async for kind, value in pieces:
            if kind == "piece":
                yield sse({"token": value}, "token")
            elif kind == "answer":
                yield sse(value.to_record(), "answer")
            else:
                yield error_event(value)
    finally:
        cancel.set()  # the client went away, or the answer is done


class AskApi:
    """edgerag's own routes over an AnswerService: POST /v1/ask and GET /v1/info."""

    def __init__(self, service: AnswerService):
        self.service = service

    async def ask(self, request: Request):
        service, opts = self.service, self.service.opts
        service.authorize(request)
        data = await service.read_json(request)
        if "question" not in data:
            raise ApiError(400, "invalid_request", "the body needs a question")
        question = service.question_of(data["question"])
        k, max_new, stream = service.settings(data)
        deadline = time.monotonic() + opts.timeout_s
        if not stream:
            return JSONResponse((await service.answer(question, k, max_new, deadline)).to_record())
        cancel = threading.Event()
        pieces = await service.start(question, k, max_new, deadline, cancel)
        return StreamingResponse(answer_events(pieces, cancel), media_type="text/event-stream")

    async def reload(self, request: Request):
        """Answer from the bundle's corpus as it is on disk now (after `edgerag sync`, say); questions
        in flight finish on the one they started with."""
        self.service.authorize(request)
        pipeline = self.service.pipeline
        changed = await asyncio.to_thread(pipeline.reload_corpus)
        return JSONResponse({"reloaded": changed, "passages": pipeline.size})

    async def info(self, request: Request):
        service, opts, pipeline = self.service, self.service.opts, self.service.pipeline
        service.authorize(request)
        m = pipeline.manifest
        return JSONResponse({
            "model": service.model_name, "format_version": m.format_version, "size_mb": round(m.megabytes, 1),
            "generator": {"model_type": m.generator.model_type, "parameters": m.generator.parameters,
                          "layers": m.generator.num_layers, "quantization": m.generator.quantization_method,
                          "max_context": m.generator.max_context},
            "query_encoder": {"parameters": m.query_encoder.parameters, "dim": m.query_encoder.dim,
                              "quantization": m.query_encoder.quantization_method},
            "passages": pipeline.size, "defaults": {"k": m.generation.k, "max_new_tokens": m.generation.max_new_tokens},
            "limits": {"concurrency": opts.concurrency, "max_queue": opts.max_queue, "timeout_s": opts.timeout_s,
                       "max_body_bytes": opts.max_body_bytes, "max_question_chars": opts.max_question_chars,
                       "max_new_tokens": opts.max_new_tokens, "max_k": opts.max_k},
        })


async def health(request: Request):
    return JSONResponse({"status": "ok"})


async def on_api_error(request: Request, e: ApiError):
    return error_response(e.status, e.kind, e.message, e.headers)


async def on_http_error(request: Request, e: HTTPException):
    kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return error_response(e.status_code, kind, str(e.detail), getattr(e, "headers", None))


async def on_prompt_error(request: Request, e: PromptError):
    return error_response(422, "invalid_question", str(e))


async def on_error(request: Request, e: Exception):  # logged by starlette; the client gets JSON
    return error_response(500, "internal", f"the request failed ({type(e).__name__}); the server goes on")


def build_app(pipeline: Pipeline, options: ServeOptions | None = None) -> Starlette:
    opts = (options or ServeOptions()).check()
    service = AnswerService(pipeline, opts)
    own, chat = AskApi(service), ChatCompletions(service)
    routes = [Route("/v1/ask", own.ask, methods=["POST"]),
              Route("/v1/chat/completions", chat.endpoint, methods=["POST"]),
              Route("/health", health, methods=["GET"]), Route("/v1/info", own.info, methods=["GET"]),
              Route("/v1/reload", own.reload, methods=["POST"]),
              Route("/v1/models", chat.models, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={ApiError: on_api_error, PromptError: on_prompt_error,
                                                        HTTPException: on_http_error, Exception: on_error})


def serve(bundle: str | Path, options: ServeOptions | None = None) -> None:
    """Load the bundle (every checksum verified) and serve it until interrupted."""
    import uvicorn

    opts = (options or ServeOptions()).check()
    if not is_loopback(opts.host) and not opts.api_key:
        raise ValueError(f"binding to {opts.host} exposes the bundle beyond this machine: give --api-key KEY")
    pipeline = Pipeline.load(bundle, threads=opts.threads, prompt_lookup=opts.prompt_lookup, answers=opts.answers,
                             abstain_threshold=opts.abstain_threshold)
    config = uvicorn.Config(build_app(pipeline, opts), host=opts.host, port=opts.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=5)
    print(f"edgerag: serving {bundle} on http://{opts.host}:{opts.port}", flush=True)
    uvicorn.Server(config).run()
