"""Sampling from an OpenAI-compatible server (vLLM, SGLang, llama.cpp, OpenAI): the `openai` generator.

One chat-completions request per prompt asks for all k samples (`"n": k`). A server that returns fewer
choices, or rejects the request with a 4xx, is remembered (per server URL, for the rest of the process) as
one that does not honour `n`: the missing samples of that prompt, and every later prompt's samples, are
asked for one request each. Each request carries a seed derived from (seed, prompt id, sample index; the
`n` request that of sample 0), so the samples are reproducible where the server honours `seed`, whether or
not it honours `n`.

Transport (async httpx, bounded concurrency, retries with exponential backoff on 429/5xx/timeouts/garbled
answers, the API key read from an environment variable and never logged) is `alignpipe.synthesis.http_transport`,
shared with the judges' `OpenAIBackend`. A 200 that is not a chat completion (cut short, not JSON, no
`choices`) is a failed attempt like a 500, never taken as a server that ignores `n`. A sample whose request
finally failed is returned as a failed candidate (see `generators.py`) whose reason names the failure and the
attempts ("HTTP 500 after 4 attempts: ..."); one prompt that raises does not fail the others.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from alignpipe.progress import progress
from alignpipe.records import Candidate, Prompt
from alignpipe.synthesis.backends import BackendError, BackendStats
from alignpipe.synthesis.generators import failed_candidate, source_record
from alignpipe.synthesis.http_transport import (
    PostResult,
    RetryPolicy,
    async_client,
    post_with_retries,
    run_sync,
)

log = logging.getLogger(__name__)

# server URL -> why `n` is not used with it (a server either honours n or not; asking again costs a request)
_SINGLE_ONLY: dict[str, str] = {}
_MEMORY_LOCK = threading.Lock()

Sample = tuple[str, bool, int | None]  # text, truncated (finish_reason "length"), completion tokens if known


def forget_servers() -> None:
    """Forget which servers ignore `n` (tests start fresh servers on reused ports)."""
    with _MEMORY_LOCK:
        _SINGLE_ONLY.clear()


def derive_seed(seed: int, prompt_id: str, tag: str | int) -> int:
    """A request's seed: stable across runs and processes (Python's `hash` of a str is salted)."""
    digest = hashlib.blake2b(f"{seed}:{prompt_id}:{tag}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


@dataclass
class SamplingStats(BackendStats):
    n_fallbacks: int = 0  # prompts whose samples (some or all) came from single-sample requests


class OpenAIGenerator:
    """k samples per prompt from `POST {base_url}/chat/completions` (`base_url` with its version prefix,
    e.g. `http://127.0.0.1:8000/v1`). A multi-turn prompt (`meta["messages"]`) is sent as its turns."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout: float = 120.0, max_retries: int = 3, backoff: float = 0.5,
                 max_backoff: float = 20.0, use_n: bool = True, id_prefix: str = "", name: str = "openai",
                 extra_body: dict | None = None) -> None:
        if concurrency < 1 or max_retries < 0:
            raise ValueError("concurrency must be >= 1 and max_retries >= 0")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model, self.api_key_env, self.concurrency = model, api_key_env, concurrency
        self.base_model = model  # the served base; `model` becomes an adapter's name once one is pushed
        self.retry = RetryPolicy(timeout, max_retries, backoff, max_backoff)
        self.use_n, self.id_prefix, self.name = use_n, id_prefix, name
        self.extra_body = dict(extra_body or {})
        self.stats = SamplingStats()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIGenerator(url={self.url!r}, model={self.model!r}, concurrency={self.concurrency})"

    def set_adapter(self, path: str | Path, load: bool = True) -> None:
        """Sample base + the LoRA adapter at `path` from now on: pushed to the server (`server_adapter.py`), or,
        with `load=False`, only its name taken (another process of the run pushed it)."""
        from alignpipe.synthesis.server_adapter import adapter_name, push_adapter

        if load:
            self.model = push_adapter(self.base_url, self.base_model, path, self.api_key_env, self.retry.timeout)
        else:
            self.model = adapter_name(self.base_model, path)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for key, value in deltas.items():
                setattr(self.stats, key, getattr(self.stats, key) + value)

    def sample(self, prompts: list[Prompt], k: int, *, temperature: float, top_p: float, max_new_tokens: int,
               seed: int, source: dict, description: str = "sampling") -> list[Candidate]:
        record = source_record(source, self.name, self.model, temperature, top_p)
        params = {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        with progress() as bar:
            task = bar.add_task(description, total=len(prompts) * k, info="")
            per_prompt = run_sync(lambda: self._sample_all(prompts, k, params, seed,
                                                           lambda n: bar.update(task, advance=n)))
        out = []
        for prompt, samples in zip(prompts, per_prompt, strict=True):
            for j, s in enumerate(samples):
                cid = f"{prompt.id}/{self.id_prefix}{j}"
                if isinstance(s, BackendError):
                    out.append(failed_candidate(prompt, cid, record, str(s)))
                else:
                    out.append(Candidate(prompt_id=prompt.id, id=cid, completion=s[0], source=dict(record),
                                         num_tokens=s[2], truncated=s[1]))
        return out

    async def _sample_all(self, prompts: list[Prompt], k: int, params: dict, seed: int,
                          advance: Callable[[int], None]) -> list[list[Sample | BackendError]]:
        semaphore = asyncio.Semaphore(self.concurrency)
        async with async_client(self.concurrency, self.retry.timeout, self.api_key_env) as client:

            async def post(body: dict) -> PostResult:
                async with semaphore:
                    return await post_with_retries(client, self.url, body, self.retry, self._count)

            async def one(prompt: Prompt) -> list[Sample | BackendError]:
                try:
                    samples = await self._sample_prompt(post, prompt, k, params, seed)
                except Exception as exc:  # noqa: BLE001 - one prompt's surprise must not fail the whole batch
                    log.warning("sampling %s raised %s: %s", prompt.id, type(exc).__name__, exc)
                    self._count(failed=k)
                    samples = [BackendError(f"client error: {type(exc).__name__}: {exc}")] * k
                advance(k)
                return samples

            return list(await asyncio.gather(*(one(p) for p in prompts)))

    async def _sample_prompt(self, post: Callable[[dict], Awaitable[PostResult]], prompt: Prompt, k: int,
                             params: dict, seed: int) -> list[Sample | BackendError]:
        messages = prompt.meta.get("messages") or [{"role": "user", "content": prompt.prompt}]
        base = {**self.extra_body, "model": self.model, "messages": messages, **params}
        samples: list[Sample | BackendError] = []
        if k > 1 and self.use_n and self.url not in _SINGLE_ONLY:
            # sample 0's seed: a server that ignores n answers exactly what a single request 0 would
            result = await post({**base, "n": k, "seed": derive_seed(seed, prompt.id, 0)})
            if result.ok:
                samples = list(self._choices(result.response)[:k])
                if len(samples) < k:
                    self._single_only(f"asked for n={k}, got {len(samples)} choice(s)")
            elif result.status is not None and 400 <= result.status < 500 and result.status != 429:
                self._single_only(f"a request with n={k} was refused: {result.summary}")
            else:  # the server itself failed (or garbled its answers): k single requests would fail the same way
                self._count(failed=k)
                return [BackendError(result.summary)] * k
            if len(samples) < k:
                self._count(n_fallbacks=1)
        singles = await asyncio.gather(*(self._single(post, base, seed, prompt.id, j)
                                         for j in range(len(samples), k)))
        return samples + list(singles)

    async def _single(self, post: Callable[[dict], Awaitable[PostResult]], base: dict, seed: int,
                      prompt_id: str, j: int) -> Sample | BackendError:
        result = await post({**base, "seed": derive_seed(seed, prompt_id, j)})
        if result.ok:
            choices = self._choices(result.response)
            if choices:
                return choices[0]
            reason = f"response without text content: {result.response.text[:200]!r}"
        else:
            reason = result.summary
        self._count(failed=1)
        return BackendError(reason)

    def _single_only(self, reason: str) -> None:
        with _MEMORY_LOCK:
            if self.url in _SINGLE_ONLY:
                return
            _SINGLE_ONLY[self.url] = reason
        log.warning("%s does not honour n (%s): one request per sample from now on", self.url, reason)

    @staticmethod
    def _choices(resp: httpx.Response) -> list[Sample]:
        """The text choices of a 200 answer in index order ([] for a malformed body)."""
        try:
            body: Any = resp.json()
            choices = sorted(body["choices"], key=lambda c: c.get("index", 0))
            texts = [(c["message"]["content"], c.get("finish_reason") == "length") for c in choices]
        except (ValueError, KeyError, TypeError, AttributeError):
            return []
        tokens = (body.get("usage") or {}).get("completion_tokens")
        known = tokens if len(texts) == 1 and isinstance(tokens, int) else None  # usage sums all choices
        return [(t, truncated, known) for t, truncated in texts if isinstance(t, str)]
