"""What both HTTP APIs of `edgerag serve` share (runtime.serve's own, runtime.openai_api's): the
server's options and limits, errors as JSON, admission to a bounded first-come-first-served queue,
a request's checks, and its answer computed in a thread and handed to the event loop piece by piece
(the limits and deadlines are described in runtime.serve's docstring).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse

from edgerag.runtime.pipeline import Answer, Pipeline
from edgerag.runtime.prompt import PromptError, check_question, check_threshold

log = logging.getLogger("edgerag.serve")

MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_depth(body: bytes) -> int:
    """How deep the body's arrays and objects nest, brackets inside strings not counted. Checked
    before parsing, so the answer does not hang on the interpreter's recursion limit, which
    libraries raise (torch's compiler sets it to 2,000) and the parser obeys."""
    brackets = np.frombuffer(_JSON_STRING.sub(b"", body), dtype=np.uint8)
    steps = np.isin(brackets, (ord("["), ord("{"))).astype(np.int32) - np.isin(brackets, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


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
    answers: str | None = None          # "spans" or "free" (None: the bundle's setting; Pipeline.load)
    abstain_threshold: float | None = None  # abstain below this confidence (None: the bundle's; Pipeline.load)
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
        check_threshold(self.abstain_threshold)
        return self


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


def error_response(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


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


def request_field(data: dict, name: str, kind, default=None, low=None, high=None):
    """data[name], of type `kind` and within [low, high], or `default` where it is absent or null;
    else a 400 (the wrong type) or a 422 (out of range)."""
    value = data.get(name, default)
    if value is None:
        return default
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)) or \
            kind is not int and not isinstance(value, kind):
        raise ApiError(400, "invalid_request", f"{name} must be {kind.__name__}, not {type(value).__name__}")
    if low is not None and value < low or high is not None and value > high:
        raise ApiError(422, "invalid_request", f"{name} must be between {low} and {high}, not {value}")
    return value


def sse(data, event: str | None = None) -> str:
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def error_event(e: Exception) -> str:
    kind, message = ("invalid_question", str(e)) if isinstance(e, PromptError) else ("internal", "the answer failed")
    return sse({"error": {"type": kind, "message": message}}, "error")


def post(loop: asyncio.AbstractEventLoop, *item) -> None:
    """loop.call_soon_threadsafe(*item) from an answer's thread; nothing once the loop has closed."""
    try:
        loop.call_soon_threadsafe(*item)
    except RuntimeError:  # the event loop has closed: the server is shutting down
        pass


async def queued_results(queue: asyncio.Queue) -> AsyncIterator[tuple[str, object]]:
    """An answer's results from its queue: ("piece", text)... then ("answer", Answer) or ("error", exception)."""
    while True:
        kind, value = await queue.get()
        yield kind, value
        if kind != "piece":
            return


class AnswerService:
    """A pipeline served over HTTP: the server's options, its admission, a request's checks, and its
    answer computed in a thread of its own."""

    def __init__(self, pipeline: Pipeline, opts: ServeOptions):
        self.pipeline, self.opts = pipeline, opts
        self.admission = Admission(opts.concurrency, opts.max_queue)
        self.model_name = Path(pipeline.path).name

    def authorize(self, request: Request) -> None:
        if self.opts.api_key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {self.opts.api_key}"
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")):
            raise ApiError(401, "unauthorized", "missing or wrong API key (Authorization: Bearer KEY)")

    async def read_json(self, request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.opts.max_body_bytes:
            raise ApiError(413, "request_too_large", f"the body is over {self.opts.max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.opts.max_body_bytes:
                raise ApiError(413, "request_too_large", f"the body is over {self.opts.max_body_bytes} bytes")
        if json_depth(bytes(body)) > MAX_JSON_DEPTH:
            raise ApiError(400, "invalid_json", f"the body nests deeper than {MAX_JSON_DEPTH} levels")
        try:
            data = json.loads(bytes(body))
        except (ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, a number too long to read
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {type(e).__name__}: {e}"[:300]) from None
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_request", "the body must be a JSON object")
        return data

    def question_of(self, text) -> str:
        if not isinstance(text, str):
            raise ApiError(400, "invalid_request", f"the question must be a string, not {type(text).__name__}")
        if len(text) > self.opts.max_question_chars:
            raise ApiError(413, "question_too_long", f"the question has {len(text)} characters; "
                                                     f"the limit is {self.opts.max_question_chars}")
        try:
            return check_question(text)
        except PromptError as e:
            raise ApiError(422, "invalid_question", str(e)) from None

    def settings(self, data: dict, max_tokens_name: str = "max_new_tokens") -> tuple[int | None, int | None, bool]:
        k = request_field(data, "k", int, None, 1, self.opts.max_k)
        max_new = request_field(data, max_tokens_name, int, None, 1, self.opts.max_new_tokens)
        return k, max_new, request_field(data, "stream", bool, False)

    async def start(self, question: str, k, max_new, deadline: float, cancel: threading.Event):
        """Admit the request (or refuse it before any response starts), start its answer in a thread of
        its own, and return an async iterator of ("piece", text)... then ("answer", Answer) or
        ("error", exception). The slot is held until the thread ends; `cancel` stops the thread early."""
        await self.admission.enter(deadline)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        try:
            threading.Thread(target=self.produce, args=(loop, queue, question, k, max_new, deadline, cancel),
                             daemon=True).start()
        except BaseException:
            self.admission.leave()
            raise
        return queued_results(queue)

    def produce(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, question: str, k, max_new,
                deadline: float, cancel: threading.Event) -> None:
        """An admitted request's answer, in its own thread: its pieces and its end posted to `queue` on
        `loop`; the slot freed when it ends."""
        try:
            stream = self.pipeline.stream(question, k, max_new, deadline, cancel)
            while True:
                try:
                    piece = next(stream)
                except StopIteration as done:
                    post(loop, queue.put_nowait, ("answer", done.value))
                    return
                post(loop, queue.put_nowait, ("piece", piece))
        except Exception as e:  # noqa: BLE001 - reported to the client, and logged here
            if not isinstance(e, PromptError):
                log.exception("answering %r failed", question[:200])
            post(loop, queue.put_nowait, ("error", e))
        finally:
            self.admission.leave()

    async def answer(self, question: str, k, max_new, deadline: float) -> Answer:
        cancel = threading.Event()
        try:
            async for kind, value in await self.start(question, k, max_new, deadline, cancel):
                if kind == "answer":
                    return value
                if kind == "error":
                    raise value
        finally:
            cancel.set()  # no-op once the answer is made; stops it if this request was cancelled
