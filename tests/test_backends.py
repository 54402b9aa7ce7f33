"""Text backends against real local servers (127.0.0.1 only): a stdlib HTTP server written here, and
llama-cpp-python's OpenAI-compatible server on the embedded GGUF; and the transformers backend."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest
from http_fakes import LocalServer, reply_json

from alignpipe.synthesis.backends import BackendError, OpenAIBackend, TransformersBackend

KEY = "sk-test-do-not-log-1234"


class FakeOpenAI(LocalServer):
    """`POST /v1/chat/completions`: answers from `plan` (a list of (status, delay_s) consumed per request,
    then 200), echoing the last user message. Records headers, bodies and the peak number in flight."""

    def __init__(self, plan=(), delay=0.0):
        super().__init__(Handler)
        self.plan = list(plan)
        self.delay = delay
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.times: list[float] = []
        self.in_flight = self.peak = 0


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        srv: FakeOpenAI = self.server  # type: ignore[assignment]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests.append({"auth": self.headers.get("Authorization"), "body": body, "path": self.path})
            srv.times.append(time.monotonic())
            status, delay = srv.plan.pop(0) if srv.plan else (200, srv.delay)
            srv.in_flight += 1
            srv.peak = max(srv.peak, srv.in_flight)
        try:
            time.sleep(delay)
            if self.path != "/v1/chat/completions":
                status = 404
            text = "echo: " + body["messages"][-1]["content"]
            payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop"}]} if status == 200 else {"error": "nope"}
            reply_json(self, status, payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass
        finally:
            with srv.lock:
                srv.in_flight -= 1


@pytest.fixture()
def server(threaded_servers):
    return lambda plan=(), delay=0.0: threaded_servers(FakeOpenAI(plan, delay))


def convs(*texts):
    return [[{"role": "user", "content": t}] for t in texts]


def test_retries_5xx_with_backoff_then_succeeds(server, monkeypatch):
    monkeypatch.setenv("ALIGNPIPE_TEST_KEY", KEY)
    srv = server(plan=[(500, 0), (503, 0)])
    backend = OpenAIBackend(srv.base_url, "m", api_key_env="ALIGNPIPE_TEST_KEY", max_retries=3, backoff=0.1)
    assert backend.complete(convs("hi"), max_new_tokens=5) == ["echo: hi"]
    assert len(srv.requests) == 3
    gaps = [b - a for a, b in zip(srv.times, srv.times[1:], strict=False)]
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19  # exponential: 0.1 s, then 0.2 s
    assert backend.stats.retries == 2 and backend.stats.failed == 0
    req = srv.requests[-1]
    assert req["auth"] == f"Bearer {KEY}" and req["path"] == "/v1/chat/completions"
    assert req["body"]["max_tokens"] == 5 and req["body"]["temperature"] == 0.0 and req["body"]["model"] == "m"


def test_gives_up_after_max_retries_and_keeps_row(server, caplog):
    srv = server(plan=[(500, 0)] * 10)
    backend = OpenAIBackend(srv.base_url, "m", max_retries=2, backoff=0.01)
    with caplog.at_level(logging.INFO, logger="alignpipe.synthesis.backends"):
        out = backend.complete(convs("a"))
    assert len(out) == 1 and isinstance(out[0], BackendError) and "HTTP 500" in out[0] and "3 attempt" in out[0]
    assert len(srv.requests) == 3 and backend.stats.failed == 1


def test_client_error_is_not_retried(server):
    srv = server(plan=[(400, 0)])
    [out] = OpenAIBackend(srv.base_url, "m", max_retries=3, backoff=0.01).complete(convs("a"))
    assert isinstance(out, BackendError) and "HTTP 400" in out and len(srv.requests) == 1


def test_timeout_is_retried_then_error(server):
    srv = server(delay=3.0)
    backend = OpenAIBackend(srv.base_url, "m", timeout=0.3, max_retries=1, backoff=0.01)
    start = time.monotonic()
    [out] = backend.complete(convs("slow"))
    assert isinstance(out, BackendError) and "timeout" in out
    assert len(srv.requests) == 2 and backend.stats.timeouts == 2
    assert time.monotonic() - start < 2.5  # gave up on each attempt long before the server answered


def test_timeout_then_success(server):
    srv = server(plan=[(200, 2.0)])
    backend = OpenAIBackend(srv.base_url, "m", timeout=0.3, max_retries=2, backoff=0.01)
    assert backend.complete(convs("x")) == ["echo: x"] and backend.stats.timeouts == 1


def test_connection_refused_is_an_error_row():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", max_retries=1, backoff=0.01)
    [out] = backend.complete(convs("a"))
    assert isinstance(out, BackendError) and "connection error" in out


def test_concurrency_is_bounded_and_order_kept(server):
    srv = server(delay=0.2)
    backend = OpenAIBackend(srv.base_url, "m", concurrency=3)
    texts = [f"q{i}" for i in range(9)]
    assert backend.complete(convs(*texts)) == [f"echo: {t}" for t in texts]
    assert 2 <= srv.peak <= 3


def test_api_key_never_shown_and_absent_when_unset(server, monkeypatch, caplog):
    monkeypatch.setenv("ALIGNPIPE_TEST_KEY", KEY)
    srv = server(plan=[(500, 0)] * 3)
    backend = OpenAIBackend(srv.base_url, "m", api_key_env="ALIGNPIPE_TEST_KEY", max_retries=2, backoff=0.01)
    with caplog.at_level(logging.DEBUG):
        out = backend.complete(convs("a"))
    assert KEY not in repr(backend) and KEY not in str(vars(backend)) and KEY not in out
    assert KEY not in caplog.text and "failed after 3 attempt" in caplog.text
    monkeypatch.delenv("ALIGNPIPE_TEST_KEY")
    backend.complete(convs("b"))
    assert srv.requests[-1]["auth"] is None


def test_complete_inside_running_event_loop(server):
    srv = server()
    backend = OpenAIBackend(srv.base_url, "m")

    async def caller():
        return backend.complete(convs("loop"))

    assert asyncio.run(caller()) == ["echo: loop"]


def test_judge_records_backend_failure_as_error(server):
    from alignpipe.evaluation.llm_judge import PointwiseLLMJudge
    from alignpipe.records import Candidate, Prompt

    srv = server(plan=[(502, 0)] * 2)
    judge = PointwiseLLMJudge(OpenAIBackend(srv.base_url, "m", max_retries=1, backoff=0.01))
    p = Prompt(id="p", prompt="x")
    js = judge.score([(p, Candidate("p", "c", "y"))])
    assert len(js) == 1 and js[0].status == "error" and "HTTP 502" in js[0].reason


# ---------------------------------------------------------------- transformers


def test_transformers_backend(tiny_model_path):
    backend = TransformersBackend(tiny_model_path, batch_size=2)
    assert backend.name == "model"
    conversations = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"}],
                     *convs("a much longer question here", "hi")]
    out = backend.complete(conversations, max_new_tokens=5)
    assert len(out) == 3 and all(isinstance(t, str) and not isinstance(t, BackendError) for t in out)
    assert backend.complete(conversations, max_new_tokens=5) == out  # greedy: deterministic
    # Batched (left-padded) greedy output equals one-at-a-time output.
    assert [backend.complete([c], max_new_tokens=5)[0] for c in conversations] == out
    sampled = TransformersBackend(tiny_model_path, seed=1).complete(conversations, 5, temperature=1.0)
    assert sampled == TransformersBackend(tiny_model_path, seed=1).complete(conversations, 5, temperature=1.0)


# ---------------------------------------------------------------- llama.cpp server


def test_judges_through_llama_cpp_server(llama_server):
    from alignpipe.evaluation.bias import BothOrdersJudge
    from alignpipe.evaluation.llm_judge import PairwiseLLMJudge, PointwiseLLMJudge
    from alignpipe.records import Candidate, Prompt

    backend = OpenAIBackend(llama_server, "smollm2-135m-instruct", api_key_env=None, concurrency=2, timeout=60)
    p = Prompt(id="p", prompt="What is 2 + 3?")
    good, bad = Candidate("p", "good", "2 + 3 = 5."), Candidate("p", "bad", "It is 7.")
    kw = {"max_new_tokens": 32, "parse_retries": 0}  # a few requests: CPU generation is slow
    points = PointwiseLLMJudge(backend, **kw).score([(p, good)])
    pairs = BothOrdersJudge(PairwiseLLMJudge(backend, **kw)).compare([(p, good, bad)])
    for j in points + pairs:
        assert j.status in ("ok", "invalid"), j.reason
    attempts = json.loads(points[0].raw)["attempts"]
    assert attempts and all(isinstance(a, str) and a.strip() for a in attempts)  # real model text came back
    assert backend.stats.failed == 0
