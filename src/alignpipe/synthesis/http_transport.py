"""The HTTP transport of the OpenAI-compatible clients: `OpenAIBackend` (judges) and
`synthesis.openai_generator` (sampling) share one retry loop and one API-key policy.

`post_with_retries` retries what may pass (HTTP 429 and 5xx, timeouts, refused or reset connections, bodies
cut short, 200 answers that are not a chat completion) a bounded number of times with exponential backoff,
honouring a 429's `Retry-After` up to a cap, and returns the last failure's kind and the attempts made, which
the clients turn into the row's error reason ("HTTP 500 after 4 attempts: ...").
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

# a child of the backends' logger: turning that one up (or capturing it) shows the retries too
log = logging.getLogger("alignpipe.synthesis.backends.transport")
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Each attempt's deadline, and how often and how patiently a failed attempt is retried."""

    timeout: float = 60.0
    max_retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 20.0


@dataclass
class PostResult:
    """The outcome of one request with its retries: the 200 answer, or the last failure's reason (its kind:
    "HTTP 500", "timeout (2s)", "truncated response body", "malformed JSON body", ...), what the server said
    (`detail`, the start of its body) and HTTP status (None for a timeout or connection error)."""

    response: httpx.Response | None
    reason: str
    attempts: int
    status: int | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.response is not None and self.response.status_code == 200

    @property
    def summary(self) -> str:
        """The failure as a row's reason: "HTTP 500 after 4 attempts: {...}"."""
        plural = "" if self.attempts == 1 else "s"
        tail = f": {self.detail}" if self.detail else ""
        return f"{self.reason} after {self.attempts} attempt{plural}{tail}"


def auth_headers(api_key_env: str | None) -> dict[str, str]:
    """JSON headers, with a bearer token from the environment variable `api_key_env` when it is set (read at
    each call; the key is never stored or logged)."""
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(api_key_env) if api_key_env else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def async_client(concurrency: int, timeout: float, api_key_env: str | None) -> httpx.AsyncClient:
    """One connection pool sized to the concurrency bound."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits, headers=auth_headers(api_key_env))


def run_sync(make_coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from synchronous code, also from inside a running event loop (then
    in a helper thread, whose exception is re-raised here)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())
    box: dict[str, Any] = {}

    def runner() -> None:
        try:
            box["out"] = asyncio.run(make_coro())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            box["exc"] = exc

    thread = threading.Thread(target=runner, name="openai-backend", daemon=True)
    thread.start()
    thread.join()
    if "exc" in box:
        raise box["exc"]
    return box["out"]


async def post_with_retries(client: httpx.AsyncClient, url: str, body: dict, policy: RetryPolicy,
                            count: Callable[..., None] = lambda **_: None) -> PostResult:
    """POST `body` as JSON. HTTP 429, 5xx, timeouts, connection errors, truncated bodies and 200 answers that
    are not a JSON object with a non-empty `choices` list are retried up to `policy.max_retries` times with
    exponential backoff (`backoff * 2**attempt`, capped at `max_backoff`; a 429's `Retry-After` is honoured
    up to the cap); other answers are returned at once. A 200 that is returned has a well-formed body.
    `count(**deltas)` receives `requests`, `retries` and `timeouts` increments."""
    reason, detail, status = "", "", None
    for attempt in range(policy.max_retries + 1):
        if attempt:
            count(retries=1)
        count(requests=1)
        retry_after: float | None = None
        try:
            resp = await asyncio.wait_for(client.post(url, json=body), policy.timeout)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            count(timeouts=1)
            reason, detail, status = f"timeout ({policy.timeout:g}s)", "", None
        except httpx.RemoteProtocolError as exc:
            # the server (or a proxy) closed the connection mid-answer, e.g. a body cut short of its length
            cut = "incomplete" in str(exc) or "complete message body" in str(exc)
            reason = "truncated response body" if cut else "connection error: RemoteProtocolError"
            detail, status = str(exc)[:200], None
        except httpx.RequestError as exc:  # refused, reset, undecodable: the transport failed
            reason, detail, status = f"connection error: {type(exc).__name__}", str(exc)[:200], None
        else:
            status = resp.status_code
            if status == 200:
                reason = _malformed(resp)
                if not reason:
                    return PostResult(resp, "", attempt + 1, 200)
                detail = repr(resp.text[:200])  # a body cut mid-JSON or garbled on the way: ask again
            else:
                reason, detail = f"HTTP {status}", resp.text[:200]
                if status != 429 and status < 500:
                    break  # a client error: asking again gives the same answer
                retry_after = _retry_after(resp)
        if attempt < policy.max_retries:
            delay = min(policy.backoff * 2**attempt, policy.max_backoff)
            if retry_after is not None:
                delay = min(max(delay, retry_after), policy.max_backoff)
            log.info("chat completion attempt %d failed (%s); retrying in %.2fs", attempt + 1, reason, delay)
            await asyncio.sleep(delay)
    log.warning("chat completion failed after %d attempt(s): %s%s", attempt + 1, reason, f": {detail}" if detail else "")
    return PostResult(None, reason, attempt + 1, status, detail)


def _malformed(resp: httpx.Response) -> str:
    """Why a 200 answer is not a chat completion ("" when it is one): not JSON, or no `choices`."""
    try:
        body = resp.json()
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return "malformed JSON body"
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list) or not body["choices"]:
        return "response without choices"
    return ""


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def wait_until_ready(base_url: str, timeout: float = 60.0, interval: float = 0.25) -> None:
    """Block until `GET {base_url}/models` answers 200 (a server just started), or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            if httpx.get(base_url.rstrip("/") + "/models", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}"
        time.sleep(interval)
    raise TimeoutError(f"{base_url} was not ready after {timeout:g}s ({last or 'no 200 answer'})")
