"""`edgerag serve BUNDLE`: one bundle over HTTP, for the other programs on a device.

    POST /v1/ask               {"question", "k"?, "max_new_tokens"?, "stream"?} -> the answer record,
                               or server-sent events: `token` events, then one `answer` event
    POST /v1/chat/completions  OpenAI's chat format (streaming chunks too); the last user message is
                               the question, the passages come back in an extra `passages` field
    GET  /health, GET /v1/info

Starlette on uvicorn: a small, well-kept ASGI stack (routing, streaming responses, a production
server) that pulls in no torch, installed with `pip install 'edgerag[serve]'`.

Answers are computed in threads, at most `concurrency` at a time (on a small CPU one answer already
uses every core); up to `max_queue` more wait, and further requests get 503 with Retry-After at
once. Every request has a deadline: one that waits past it gets 503, one whose answer runs past it
is cut (stop_reason "deadline"); an answer whose client went away stops at its next token. Errors are JSON, `{"error": {"type", "message"}}`, and never stop
the server. The Pipeline is shared by the threads (see Pipeline.load): answers are those of a
sequential run.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from edgerag.runtime.pipeline import Answer, Pipeline, check_question
from edgerag.runtime.prompt import PromptError

log = logging.getLogger("edgerag.serve")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    threads: int | None = None          # onnxruntime intra-op threads per session (default: all cores)
    concurrency: int = 1                # answers computed at once
    max_queue: int = 8                  # requests waiting beyond those; more get 503
    api_key: str | None = None          # required (Bearer) when binding beyond loopback
    timeout_s: float = 60.0             # each request's deadline, waiting included
    max_body_bytes: int = 64 * 1024
    max_question_chars: int = 4000
    max_new_tokens: int = 256           # the most a request may ask for
    max_k: int = 20
    prompt_lookup: int | None = None    # tokens drafted per decode step (None: the runtime's default; 0: none)

    def check(self) -> "ServeOptions":
        for name, value, low in (("concurrency", self.concurrency, 1), ("max_queue", self.max_queue, 0),
                                 ("max_body_bytes", self.max_body_bytes, 1024), ("max_question_chars", self.max_question_chars, 1),
                                 ("max_new_tokens", self.max_new_tokens, 1), ("max_k", self.max_k, 1),
                                 ("port", self.port, 0)):
            if value < low:
                raise ValueError(f"{name} must be at least {low}, not {value}")
        if not self.timeout_s > 0:
            raise ValueError(f"the timeout must be positive, not {self.timeout_s}")
        return self


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


def error_response(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Waiter:
    __slots__ = ("loop", "future", "granted")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.future, self.granted = loop, loop.create_future(), False


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class Admission:
    """At most `concurrency` answers at once and `max_queue` waiting, served first come, first served;
    a request beyond that is refused.

    Thread-safe: a slot is freed by the thread that computed the answer, and handed to the oldest
    waiting request under the same lock, so a request that gives up (its deadline, or its client
    leaving) at that moment passes the slot on instead of losing it."""

    def __init__(self, concurrency: int, max_queue: int):
        self.free, self.limit = concurrency, concurrency + max_queue
        self.admitted = 0
        self.waiters: deque[_Waiter] = deque()
        self.lock = threading.Lock()

    async def enter(self, deadline: float) -> None:
        with self.lock:
            if self.admitted >= self.limit:
                raise ApiError(503, "overloaded", f"{self.admitted} requests are in progress or waiting; retry later",
                               {"Retry-After": "1"})
            self.admitted += 1
            if self.free > 0:
                self.free -= 1
                return
            waiter = _Waiter(asyncio.get_running_loop())
            self.waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout=max(deadline - time.monotonic(), 0.0))
        except BaseException as e:  # out of time, or cancelled (the client went away): not admitted
            with self.lock:
                if waiter.granted:
                    self._hand_on()
                else:
                    self.waiters.remove(waiter)
                self.admitted -= 1
            if isinstance(e, asyncio.TimeoutError):
                raise ApiError(503, "timeout", "the request waited past its deadline for a free slot",
                               {"Retry-After": "1"}) from None
            raise

    def leave(self) -> None:
        with self.lock:
            self.admitted -= 1
            self._hand_on()

    def _hand_on(self) -> None:
        """A slot is free: to the oldest waiter whose event loop still runs, else back to the pool (lock held)."""
        while self.waiters:
            waiter = self.waiters.popleft()
            try:
                waiter.loop.call_soon_threadsafe(_wake, waiter.future)
            except RuntimeError:  # its loop has closed
                continue
            waiter.granted = True
            return
        self.free += 1


def build_app(pipeline: Pipeline, options: ServeOptions | None = None) -> Starlette:
    opts = (options or ServeOptions()).check()
    admission = Admission(opts.concurrency, opts.max_queue)
    model_name = Path(pipeline.path).name

    def authorize(request: Request) -> None:
        if opts.api_key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {opts.api_key}"
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")):
            raise ApiError(401, "unauthorized", "missing or wrong API key (Authorization: Bearer KEY)")

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > opts.max_body_bytes:
            raise ApiError(413, "request_too_large", f"the body is over {opts.max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > opts.max_body_bytes:
                raise ApiError(413, "request_too_large", f"the body is over {opts.max_body_bytes} bytes")
        try:
            data = json.loads(bytes(body))
        except (ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, a number too long to read
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {type(e).__name__}: {e}"[:300]) from None
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_request", "the body must be a JSON object")
        return data

    def field(data: dict, name: str, kind, default=None, low=None, high=None):
        value = data.get(name, default)
        if value is None:
            return default
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)) or \
                kind is not int and not isinstance(value, kind):
            raise ApiError(400, "invalid_request", f"{name} must be {kind.__name__}, not {type(value).__name__}")
        if low is not None and value < low or high is not None and value > high:
            raise ApiError(422, "invalid_request", f"{name} must be between {low} and {high}, not {value}")
        return value

    def question_of(text) -> str:
        if not isinstance(text, str):
            raise ApiError(400, "invalid_request", f"the question must be a string, not {type(text).__name__}")
        if len(text) > opts.max_question_chars:
            raise ApiError(413, "question_too_long", f"the question has {len(text)} characters; "
                                                     f"the limit is {opts.max_question_chars}")
        try:
            return check_question(text)
        except PromptError as e:
            raise ApiError(422, "invalid_question", str(e)) from None

    def settings(data: dict, max_tokens_name: str = "max_new_tokens") -> tuple[int | None, int | None, bool]:
        k = field(data, "k", int, None, 1, opts.max_k)
        max_new = field(data, max_tokens_name, int, None, 1, opts.max_new_tokens)
        return k, max_new, field(data, "stream", bool, False)

    async def start(question: str, k, max_new, deadline: float, cancel: threading.Event):
        """Admit the request (or refuse it before any response starts), start its answer in a thread of
        its own, and return an async iterator of ("piece", text)... then ("answer", Answer) or
        ("error", exception). The slot is held until the thread ends; `cancel` stops the thread early."""
        await admission.enter(deadline)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def post(*item):
            try:
                loop.call_soon_threadsafe(*item)
            except RuntimeError:  # the event loop has closed: the server is shutting down
                pass

        def produce():
            try:
                stream = pipeline.stream(question, k, max_new, deadline, cancel)
                while True:
                    try:
                        piece = next(stream)
                    except StopIteration as done:
                        post(queue.put_nowait, ("answer", done.value))
                        return
                    post(queue.put_nowait, ("piece", piece))
            except Exception as e:  # noqa: BLE001 - reported to the client, and logged here
                if not isinstance(e, PromptError):
                    log.exception("answering %r failed", question[:200])
                post(queue.put_nowait, ("error", e))
            finally:
                admission.leave()

        try:
            threading.Thread(target=produce, daemon=True).start()
        except BaseException:
            admission.leave()
            raise

        async def results():
            while True:
                kind, value = await queue.get()
                yield kind, value
                if kind != "piece":
                    return
        return results()

    async def answer(question: str, k, max_new, deadline: float) -> Answer:
        cancel = threading.Event()
        try:
            async for kind, value in await start(question, k, max_new, deadline, cancel):
                if kind == "answer":
                    return value
                if kind == "error":
                    raise value
        finally:
            cancel.set()  # no-op once the answer is made; stops it if this request was cancelled

    def sse(data, event: str | None = None) -> str:
        return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def error_event(e: Exception) -> str:
        kind, message = ("invalid_question", str(e)) if isinstance(e, PromptError) else ("internal", "the answer failed")
        return sse({"error": {"type": kind, "message": message}}, "error")

    async def ask_endpoint(request: Request):
        authorize(request)
        data = await read_json(request)
        if "question" not in data:
            raise ApiError(400, "invalid_request", "the body needs a question")
        question = question_of(data["question"])
        k, max_new, stream = settings(data)
        deadline = time.monotonic() + opts.timeout_s
        if not stream:
            return JSONResponse((await answer(question, k, max_new, deadline)).to_record())
        cancel = threading.Event()
        pieces = await start(question, k, max_new, deadline, cancel)

        async def events():
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
        return StreamingResponse(events(), media_type="text/event-stream")

    def last_user_message(data: dict) -> str:
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "invalid_request", "messages must be a non-empty list")
        for message in reversed(messages):
            if not isinstance(message, dict):
                raise ApiError(400, "invalid_request", "each message must be an object")
            if message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, list):  # content parts: the text ones, joined
                    texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
                    if not all(isinstance(p, dict) for p in content) or not all(isinstance(t, str) for t in texts):
                        raise ApiError(400, "invalid_request", "content parts must be objects, their text strings")
                    content = "".join(texts)
                return question_of(content)
        raise ApiError(400, "invalid_request", "no message with role 'user'")

    def finish_reason(a: Answer) -> str:
        return "length" if a.stop_reason in ("length", "deadline", "cancelled") else "stop"

    async def chat_endpoint(request: Request):
        authorize(request)
        data = await read_json(request)
        question = last_user_message(data)
        max_new = field(data, "max_completion_tokens", int, None, 1, opts.max_new_tokens) or \
            field(data, "max_tokens", int, None, 1, opts.max_new_tokens)
        k = field(data, "k", int, None, 1, opts.max_k)
        stream = field(data, "stream", bool, False)
        deadline = time.monotonic() + opts.timeout_s
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": completion_id, "created": created, "model": model_name}
        if not stream:
            a = await answer(question, k, max_new, deadline)
            return JSONResponse({**base, "object": "chat.completion",
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": a.answer},
                                              "finish_reason": finish_reason(a)}],
                                 "usage": {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.new_tokens,
                                           "total_tokens": a.prompt_tokens + a.new_tokens},
                                 "passages": a.passages, "timings": a.to_record()["timings"]})
        cancel = threading.Event()
        pieces = await start(question, k, max_new, deadline, cancel)

        def chunk(delta: dict, reason=None, **extra) -> str:
            return sse({**base, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": reason}], **extra})

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for kind, value in pieces:
                    if kind == "piece":
                        yield chunk({"content": value})
                    elif kind == "answer":
                        yield chunk({}, finish_reason(value), passages=value.passages)
                    else:
                        yield error_event(value)
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()
        return StreamingResponse(events(), media_type="text/event-stream")

    async def health(request: Request):
        return JSONResponse({"status": "ok"})

    async def info(request: Request):
        authorize(request)
        m = pipeline.manifest
        return JSONResponse({
            "model": model_name, "format_version": m.format_version, "size_mb": round(m.megabytes, 1),
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

    async def on_api_error(request: Request, e: ApiError):
        return error_response(e.status, e.kind, e.message, e.headers)

    async def on_http_error(request: Request, e: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return error_response(e.status_code, kind, str(e.detail), getattr(e, "headers", None))

    async def on_prompt_error(request: Request, e: PromptError):
        return error_response(422, "invalid_question", str(e))

    async def on_error(request: Request, e: Exception):  # logged by starlette; the client gets JSON
        return error_response(500, "internal", f"the request failed ({type(e).__name__}); the server goes on")

    routes = [Route("/v1/ask", ask_endpoint, methods=["POST"]),
              Route("/v1/chat/completions", chat_endpoint, methods=["POST"]),
              Route("/health", health, methods=["GET"]), Route("/v1/info", info, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={ApiError: on_api_error, PromptError: on_prompt_error,
                                                        HTTPException: on_http_error, Exception: on_error})


def serve(bundle: str | Path, options: ServeOptions | None = None) -> None:
    """Load the bundle (every checksum verified) and serve it until interrupted."""
    import uvicorn

    opts = (options or ServeOptions()).check()
    if not is_loopback(opts.host) and not opts.api_key:
        raise ValueError(f"binding to {opts.host} exposes the bundle beyond this machine: give --api-key KEY")
    pipeline = Pipeline.load(bundle, threads=opts.threads, prompt_lookup=opts.prompt_lookup)
    config = uvicorn.Config(build_app(pipeline, opts), host=opts.host, port=opts.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=5)
    print(f"edgerag: serving {bundle} on http://{opts.host}:{opts.port}", flush=True)
    uvicorn.Server(config).run()
