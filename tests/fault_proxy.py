"""A reverse proxy on 127.0.0.1 that spoils some of the requests it passes to a real OpenAI-compatible server,
and the real llama.cpp server as a process a test may kill and start again on the same port.

`FaultProxy(upstream, plan)` forwards every request to `upstream` (e.g. the `llama_server` fixture's URL) unless
its `FaultPlan` picks a fault for it:

- `500`: HTTP 500, answered by the proxy (the server never sees the request);
- `429`: HTTP 429 with `Retry-After: plan.retry_after` seconds;
- `hang`: no answer for `plan.hang_s` seconds (past the client's timeout), then the connection closes;
- `truncate`: the server's real answer, its full `Content-Length` announced, cut in the middle of the JSON and
  the connection closed;
- `malformed`: the server's real answer with its `"choices"` key unquoted (not JSON), correct length;
- `no_choices`: the server's real answer, valid JSON, without `choices`.

A plan picks faults by the index of a chat request (`at`, in arrival order), or per *row*: a row is what a
client retries (the same messages and seed), so a row picked by `rate` (seeded, independent of arrival
order and concurrency) or by `rows` (a function of the request body) is spoiled on its first `times`
attempts (all of them by default: the row must end as an error however often it is retried).

The proxy counts requests per path, faults per kind and attempts per row, so a test can count what the
client really asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import random
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

FAULTS = ("500", "429", "hang", "truncate", "malformed", "no_choices")
CHAT_PATH = "/v1/chat/completions"


def row_key(body: dict) -> str:
    """What identifies one row across its retries: the conversation and the sampling seed."""
    text = json.dumps([body.get("messages"), body.get("seed")], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def row_text(body: dict) -> str:
    """All message contents of a request, for plans that pick rows by what they ask."""
    return "\n".join(str(m.get("content", "")) for m in body.get("messages") or [])


@dataclass
class FaultPlan:
    """Which chat requests to spoil, and how (see the module docstring)."""

    at: dict[int, str] = field(default_factory=dict)  # chat request index -> fault
    rate: float = 0.0  # share of rows spoiled, chosen per row with a seeded RNG
    kinds: tuple[str, ...] = FAULTS  # the faults `rate` draws from
    seed: int = 0
    rows: Callable[[dict], str | None] | None = None  # request body -> fault for its row, or None
    times: int | None = None  # attempts of a picked row spoiled (None: every attempt)
    retry_after: str = "1"  # the 429's Retry-After header (seconds)
    hang_s: float = 5.0  # how long a `hang` keeps the client waiting

    def __post_init__(self) -> None:
        unknown = {*self.at.values(), *self.kinds} - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULTS}")

    def row_fault(self, body: dict) -> str | None:
        """The fault of a row (before `times` is applied), the same for every attempt of the row."""
        if self.rows is not None:
            return self.rows(body)
        if self.rate > 0:
            rng = random.Random(f"{self.seed}:{row_key(body)}")
            if rng.random() < self.rate:
                return rng.choice(self.kinds)
        return None


class FaultProxy(ThreadingHTTPServer):
    """The proxy; `with FaultProxy(upstream, plan) as proxy:` serves it on a free port until the block ends.
    `proxy.base_url` is what a client is given; `proxy.plan` may be replaced between batches."""

    daemon_threads = True

    def __init__(self, upstream: str, plan: FaultPlan | None = None, upstream_timeout: float = 120.0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.upstream_timeout = upstream_timeout
        self.plan = plan or FaultPlan()
        self.lock = threading.Lock()
        self.released = threading.Event()  # set on close: hanging handlers stop waiting
        self.requests: Counter[str] = Counter()  # "POST /v1/chat/completions" -> count
        self.faults: Counter[str] = Counter()  # fault kind -> injected count
        self.attempts: Counter[str] = Counter()  # row key -> chat requests seen
        self.row_faults: dict[str, str] = {}  # row key -> the fault it was given (last one)
        self.forwarded = 0  # requests the upstream server answered
        self.upstream_errors = 0  # requests the upstream could not be reached for (answered 502)
        self._chat_index = 0
        self._dealt: Counter[str] = Counter()  # row key -> faults dealt so far (for `times`)
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def chat_requests(self) -> int:
        return self.requests[f"POST {CHAT_PATH}"]

    def reset_counts(self) -> None:
        """Zero every counter (not the plan's per-row memory of faults dealt)."""
        with self.lock:
            for counter in (self.requests, self.faults, self.attempts):
                counter.clear()
            self.row_faults.clear()
            self.forwarded = self.upstream_errors = 0

    def decide(self, method: str, path: str, body: dict | None) -> str | None:
        """Count the request and pick its fault (None: forward it untouched)."""
        with self.lock:
            self.requests[f"{method} {path}"] += 1
            if method != "POST" or path != CHAT_PATH or body is None:
                return None
            index, self._chat_index = self._chat_index, self._chat_index + 1
            key = row_key(body)
            self.attempts[key] += 1
            fault = self.plan.at.get(index)
            if fault is None:
                fault = self.plan.row_fault(body)
                if fault is not None and self.plan.times is not None and self._dealt[key] >= self.plan.times:
                    fault = None
            if fault is not None:
                self._dealt[key] += 1
                self.faults[fault] += 1
                self.row_faults[key] = fault
            return fault

    def forward(self, method: str, path: str, data: bytes | None, headers: dict[str, str]
                ) -> tuple[int, list[tuple[str, str]], bytes] | None:
        """The upstream's answer (status, headers, body), or None when it cannot be reached."""
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=self.upstream_timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException):
            with self.lock:
                self.upstream_errors += 1
            return None
        finally:
            conn.close()
        with self.lock:
            self.forwarded += 1
        return resp.status, resp.getheaders(), payload

    def __enter__(self) -> FaultProxy:
        self._thread = threading.Thread(target=self.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.released.set()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: FaultProxy

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's signature
        pass  # quiet: the counters are the record

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._handle(None)

    def do_POST(self) -> None:  # noqa: N802
        self._handle(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

    def _handle(self, data: bytes | None) -> None:
        try:
            body = json.loads(data) if data else None
        except ValueError:
            body = None
        fault = self.server.decide(self.command, self.path, body if isinstance(body, dict) else None)
        plan = self.server.plan
        if fault == "500":
            return self._send(500, {"error": {"message": "injected server error", "type": "server_error"}})
        if fault == "429":
            return self._send(429, {"error": {"message": "injected rate limit"}},
                              (("Retry-After", plan.retry_after),))
        if fault == "hang":
            self.server.released.wait(plan.hang_s)
            self.close_connection = True
            return None
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}
        answer = self.server.forward(self.command, self.path, data, headers)
        if answer is None:
            return self._send(502, {"error": {"message": "upstream unreachable"}})
        status, upstream_headers, payload = answer
        if status == 200 and fault == "truncate":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[: len(payload) // 2])  # cut mid-JSON, then hang up
            self.wfile.flush()
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return None
        if status == 200 and fault == "malformed":
            payload = payload.replace(b'"choices"', b"choices", 1)
        elif status == 200 and fault == "no_choices":
            parsed = json.loads(payload)
            parsed.pop("choices", None)
            payload = json.dumps(parsed).encode()
        content_type = dict((k.lower(), v) for k, v in upstream_headers).get("content-type", "application/json")
        self._send_bytes(status, payload, [("Content-Type", content_type)])
        return None

    def _send(self, status: int, payload: dict, extra: tuple[tuple[str, str], ...] = ()) -> None:
        self._send_bytes(status, json.dumps(payload).encode(), [("Content-Type", "application/json"), *extra])

    def _send_bytes(self, status: int, data: bytes, headers: list[tuple[str, str]]) -> None:
        try:
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client gave up (its timeout) before the answer: nothing to tell it


# ---------------------------------------------------------------- the real server as a killable process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaProcess:
    """llama-cpp-python's OpenAI-compatible server on the embedded GGUF as a child process on a fixed port:
    `start()` (waits until it answers), `kill()` (SIGKILL, like a crash), `start()` again on the same port."""

    def __init__(self, gguf: Path, port: int, log_path: Path, alias: str = "smollm2-135m-instruct") -> None:
        self.gguf, self.port, self.log_path, self.alias = gguf, port, log_path, alias
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 120.0) -> None:
        from alignpipe.synthesis.backends import wait_until_ready

        with open(self.log_path, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--host", "127.0.0.1",
                 "--port", str(self.port), "--n_ctx", "2048", "--n_threads", "2", "--model_alias", self.alias],
                stdout=fh, stderr=subprocess.STDOUT)
        try:
            wait_until_ready(self.base_url, timeout=timeout)
        except TimeoutError as exc:
            raise RuntimeError(f"llama.cpp server did not start: {self.log_path.read_text()[-2000:]}") from exc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
