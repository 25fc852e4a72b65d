"""`edgerag serve`: the HTTP API, in process (starlette's TestClient) and as a real server on loopback."""

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from edgerag.benchmarks.reliability.server import request  # noqa: E402
from edgerag.runtime import Pipeline  # noqa: E402
from edgerag.runtime.http_answers import Admission, ApiError, ServeOptions  # noqa: E402
from edgerag.runtime.serve import build_app, serve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE_VENV = ROOT / ".venv-base"
QUESTIONS = ["Which team won Super Bowl 50?", "What is the capital of Poland?", "Where is Victoria?",
             "What is the atomic number of oxygen?", "Who were the Normans?", "What is geology?"]


@pytest.fixture(scope="module")
def pipeline(tiny_bundle):
    return Pipeline.load(tiny_bundle)


@pytest.fixture(scope="module")
def client(pipeline):
    return TestClient(build_app(pipeline, ServeOptions(max_question_chars=500, max_body_bytes=4096)))


def events(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) of each server-sent event."""
    out = []
    for block in text.strip().split("\n\n"):
        name, data = None, None
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        out.append((name, data))
    return out


def test_health_and_info(client, pipeline):
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/v1/info").json()
    assert info["passages"] == pipeline.manifest.passages.count
    assert info["generator"]["quantization"] == pipeline.manifest.generator.quantization_method


def test_ask_gives_the_pipelines_answer(client, pipeline):
    record = client.post("/v1/ask", json={"question": QUESTIONS[0], "k": 2, "max_new_tokens": 6}).json()
    direct = pipeline.ask(QUESTIONS[0], k=2, max_new_tokens=6)
    assert record["answer"] == direct.answer
    assert [p["id"] for p in record["passages"]] == [p["id"] for p in direct.passages]
    assert {"id", "title", "score", "text"} <= set(record["passages"][0])
    assert {"encode_ms", "search_ms", "prefill_ms", "total_ms"} <= set(record["timings"])


def test_ask_streams_tokens_then_the_record(client, pipeline):
    response = client.post("/v1/ask", json={"question": QUESTIONS[1], "max_new_tokens": 8, "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    got = events(response.text)
    assert [name for name, _ in got[:-1]] == ["token"] * (len(got) - 1) and got[-1][0] == "answer"
    record = json.loads(got[-1][1])
    assert "".join(json.loads(d)["token"] for _, d in got[:-1]).strip() == record["answer"]
    assert record["answer"] == pipeline.ask(QUESTIONS[1], max_new_tokens=8).answer


def test_chat_completions_format(client, pipeline):
    body = {"model": "x", "messages": [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": QUESTIONS[2]}], "max_tokens": 6}
    reply = client.post("/v1/chat/completions", json=body).json()
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"] == {"role": "assistant",
                                              "content": pipeline.ask(QUESTIONS[2], max_new_tokens=6).answer}
    assert reply["choices"][0]["finish_reason"] in ("stop", "length") and reply["passages"]
    streamed = events(client.post("/v1/chat/completions", json={**body, "stream": True}).text)
    assert streamed[-1] == (None, "[DONE]")
    chunks = [json.loads(d) for _, d in streamed[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).strip() == \
        reply["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == reply["choices"][0]["finish_reason"]


@pytest.mark.parametrize("body,status,kind", [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_request"),
    (json.dumps({"question": 5}).encode(), 400, "invalid_request"),
    (json.dumps({"question": "ok?", "k": "3"}).encode(), 400, "invalid_request"),
    (json.dumps({"question": "ok?", "max_new_tokens": True}).encode(), 400, "invalid_request"),
    (json.dumps({"question": "ok?", "stream": "yes"}).encode(), 400, "invalid_request"),
    (json.dumps({"nothing": 1}).encode(), 400, "invalid_request"),
    (json.dumps({"question": "   "}).encode(), 422, "invalid_question"),
    (json.dumps({"question": "ok?", "k": 0}).encode(), 422, "invalid_request"),
    (json.dumps({"question": "ok?", "max_new_tokens": 10 ** 6}).encode(), 422, "invalid_request"),
    (json.dumps({"question": "x" * 501}).encode(), 413, "question_too_long"),
    (json.dumps({"question": "x" * 5000}).encode(), 413, "request_too_large"),
    (b"[" * 1500 + b"]" * 1500, 400, "invalid_json"),                     # nested past the parser's recursion
])
def test_bad_requests_are_json_errors_and_the_server_goes_on(client, body, status, kind):
    response = client.post("/v1/ask", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"] == kind and response.json()["error"]["message"]
    assert client.get("/health").status_code == 200


def test_nesting_is_refused_whatever_the_recursion_limit(client):
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(5000)  # as torch's compiler leaves it; json.loads then parses 1,500 levels
    try:
        nested = b'{"question": "ok?", "k": ' + b"[" * 70 + b"]" * 70 + b"}"
        response = client.post("/v1/ask", content=nested)
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_json"
        in_a_string = client.post("/v1/ask", json={"question": "[" * 100 + "?", "max_new_tokens": 2})
        assert in_a_string.status_code == 200, in_a_string.text
    finally:
        sys.setrecursionlimit(limit)


def test_a_number_too_long_to_read_is_bad_json(pipeline):
    client = TestClient(build_app(pipeline))
    response = client.post("/v1/ask", content=b'{"question": "q?", "k": ' + b"9" * 5000 + b"}")
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_json"


def test_chat_content_parts(client, pipeline):
    parts = [{"type": "text", "text": "Which team won "}, {"type": "image_url"}, {"type": "text", "text": "Super Bowl 50?"}]
    reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}], "max_tokens": 5})
    assert reply.json()["choices"][0]["message"]["content"] == pipeline.ask(QUESTIONS[0], max_new_tokens=5).answer
    bad = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request"


@pytest.mark.parametrize("change", [{"concurrency": 0}, {"max_queue": -1}, {"timeout_s": 0}, {"max_body_bytes": 10}])
def test_serve_options_are_checked(change):
    with pytest.raises(ValueError):
        ServeOptions(**change).check()


def test_unknown_routes_and_methods_are_json(client):
    assert client.get("/nowhere").json()["error"]["type"] == "not_found"
    assert client.get("/v1/ask").json()["error"]["type"] == "method_not_allowed"
    bad = client.post("/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "hi"}]})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request"


def test_api_key(pipeline):
    client = TestClient(build_app(pipeline, ServeOptions(api_key="s3cret")))
    assert client.post("/v1/ask", json={"question": QUESTIONS[0]}).status_code == 401
    wrong = client.post("/v1/ask", json={"question": QUESTIONS[0]}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "unauthorized"
    right = client.post("/v1/ask", json={"question": QUESTIONS[0], "max_new_tokens": 2},
                        headers={"Authorization": "Bearer s3cret"})
    assert right.status_code == 200
    assert client.get("/health").status_code == 200  # health checks need no key


def test_binding_beyond_loopback_needs_a_key(tiny_bundle):
    with pytest.raises(ValueError, match="--api-key"):
        serve(tiny_bundle, ServeOptions(host="0.0.0.0"))


def test_admission_refuses_beyond_the_queue_and_serves_in_order():
    async def scenario():
        admission = Admission(concurrency=1, max_queue=3)
        deadline = time.monotonic() + 5
        await admission.enter(deadline)                              # running
        order = []

        async def wait(name):
            await admission.enter(deadline)
            order.append(name)
        queued = [asyncio.ensure_future(wait(n)) for n in ("first", "second")]
        await asyncio.sleep(0.01)
        gives_up = asyncio.ensure_future(admission.enter(deadline))  # a client that leaves while waiting
        await asyncio.sleep(0.01)
        with pytest.raises(ApiError) as refused:
            await admission.enter(deadline)                          # beyond the queue
        assert refused.value.status == 503 and refused.value.headers["Retry-After"]
        gives_up.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gives_up
        for _ in range(2):                                           # two answers' threads end
            threading.Thread(target=admission.leave).start()
            await asyncio.sleep(0.05)
        await asyncio.gather(*queued)
        assert order == ["first", "second"]                          # first come, first served
        with pytest.raises(ApiError) as late:                        # one that cannot get a slot in time
            await admission.enter(time.monotonic() + 0.05)
        assert late.value.kind == "timeout"
        admission.leave()
        assert admission.admitted == 0 and admission.free == 1 and not admission.waiters
    asyncio.run(scenario())


def test_openai_client_against_the_server(tiny_bundle, live_server):
    openai = pytest.importorskip("openai")
    pipeline = Pipeline.load(tiny_bundle, answers="spans")
    with live_server("--answers", "spans") as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="edgerag", max_tokens=6,
                                               messages=[{"role": "user", "content": QUESTIONS[0]}])
        expected = pipeline.ask(QUESTIONS[0], max_new_tokens=6).answer
        assert reply.choices[0].message.content == expected
        assert reply.model_extra["passages"][0]["id"]
        assert reply.model_extra["supported"] == bool(reply.model_extra["citations"]) == bool(expected)
        pieces, last = [], None
        for chunk in client.chat.completions.create(model="edgerag", max_tokens=6, stream=True,
                                                    messages=[{"role": "user", "content": QUESTIONS[0]}]):
            pieces.append(chunk.choices[0].delta.content or "")
            last = chunk
        assert "".join(pieces).strip() == expected
        assert last.model_extra["citations"] == reply.model_extra["citations"]  # the last chunk carries them
        models = client.models.list()
        assert [m.id for m in models.data] == [reply.model]


def test_concurrent_clients_get_the_sequential_answers(tiny_bundle, live_server):
    from edgerag.benchmarks.reliability.load_and_soak import load

    pipeline = Pipeline.load(tiny_bundle)
    questions = QUESTIONS * 2
    sequential = [pipeline.ask(q, max_new_tokens=10).answer for q in questions]
    with live_server("--max-queue", "16") as (url, _):
        row, = load(url, questions, [8], 10, sequential)
    assert row["errors"] == 0 and row["identical_to_sequential"] == 8 * len(questions)


@pytest.mark.skipif(not (BASE_VENV / ".installed").exists(), reason="make install-base builds the base-install venv")
def test_serve_runs_on_the_base_install_with_its_extra(live_server):
    python = BASE_VENV / "bin" / "python"
    probe = subprocess.run([python, "-c", "import sys, edgerag.runtime.serve; "
                            "print([m for m in ('torch', 'transformers', 'optimum') if m in sys.modules])"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr
    with live_server(python=python) as (url, _):
        status, reply = request(url + "/v1/ask", {"question": QUESTIONS[0], "max_new_tokens": 3})
        assert status == 200 and reply["passages"]
