"""Text backends: chat conversations in, one completion text per conversation out.

Both implement `alignpipe.evaluation.base.TextBackend` (`name`, `complete(...)`), so any LLM judge runs
on a local transformers model or on an OpenAI-compatible server (vLLM, SGLang, llama.cpp, OpenAI).

A conversation that could not be completed is not an exception and not a lost row: its slot in the
returned list holds a `BackendError`, a `str` subclass whose text is the reason. Judges record such a
slot as a judgment with `status="error"`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

# the shared transport, re-exported: callers and tests import it from here
from alignpipe.synthesis.http_transport import (  # noqa: F401
    PostResult,
    RetryPolicy,
    async_client,
    auth_headers,
    post_with_retries,
    run_sync,
    wait_until_ready,
)

log = logging.getLogger(__name__)

Message = dict[str, str]  # {"role": ..., "content": ...}, as in alignpipe.evaluation.base


class BackendError(str):
    """Marks a conversation the backend could not complete; the string is the reason."""

    __slots__ = ()


def seeded_generation(model, tokenizer, texts: list[str], max_new_tokens: int, temperature: float,  # noqa: ANN001
                      top_p: float, batch_size: int, seed: int) -> list[list[int] | str]:
    """New token ids (before EOS) per already-rendered text, in length-sorted batches, each batch's sampling
    seeded from `seed`, so a call is reproducible; the rows of a batch that fails hold a `BackendError`."""
    import torch

    from alignpipe.synthesis.transformers_backend import _eos_ids, generate_batch

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    eos_ids = _eos_ids(model, tokenizer)
    seeds = torch.Generator().manual_seed(seed)
    out: list[list[int] | str] = [BackendError("not generated")] * len(texts)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=seeds)))
        try:
            results = generate_batch(model, tokenizer, [texts[i] for i in batch], max_new_tokens, temperature,
                                     top_p, eos_ids)
        except Exception as exc:  # noqa: BLE001 - a failed batch is recorded per row, never raised
            log.warning("generation failed for a batch of %d: %s: %s", len(batch), type(exc).__name__, exc)
            for i in batch:
                out[i] = BackendError(f"generation failed: {type(exc).__name__}: {exc}")
            continue
        for i, (tokens, _ended) in zip(batch, results, strict=True):
            out[i] = tokens
    return out


def is_backend_error(text: str) -> bool:
    return isinstance(text, BackendError)


class TransformersBackend:
    """A local causal LM through its chat template: batched, left-padded, greedy unless temperature > 0.

    Conversations are sorted by length so a batch pads little; outputs come back in input order.
    Sampling is seeded from `seed` and the number of earlier `complete()` calls, so a run is repeatable.
    A batch that fails (for example out of memory) yields `BackendError`s for its rows only.
    """

    def __init__(self, model_path: str | Path, batch_size: int = 16, top_p: float = 1.0, seed: int = 0,
                 name: str | None = None, device: str | None = None):
        from alignpipe.models import load_policy, load_tokenizer

        self.model_path = Path(model_path)
        self.name = name or self.model_path.resolve().name
        self.batch_size = batch_size
        self.top_p = top_p
        self.seed = seed
        self.tokenizer = load_tokenizer(self.model_path)
        self.model = load_policy(self.model_path)
        if device is not None:
            self.model.to(device)
        self.model.eval()
        self._calls = 0

    def complete(self, conversations: list[list[Message]], max_new_tokens: int = 256,
                 temperature: float = 0.0) -> list[str]:
        from alignpipe.data.chat import format_messages

        texts = [format_messages(self.tokenizer, conv) for conv in conversations]
        ids = seeded_generation(self.model, self.tokenizer, texts, max_new_tokens, temperature, self.top_p,
                                self.batch_size, self.seed + self._calls)
        self._calls += 1
        return [t if is_backend_error(t) else self.tokenizer.decode(t, skip_special_tokens=True) for t in ids]

    def choice_logprobs(self, conversations: list[list[Message]], assistant_prefix: str | list[str],
                        choices: list[str], *, then: Callable[[int, int, dict[str, float]], str | None] | None = None,
                        precision: str = "auto", description: str = "scoring choices"
                        ) -> list[list[dict[str, float]] | str]:
        """Log-probabilities of fixed answers after a pre-filled assistant turn, no generation: per
        conversation (chat template with the generation prompt, then `assistant_prefix`), one
        `{choice: log P(choice)}` dict per step; `then(row, step, logprobs)` may give a row a longer prefix
        for another step on the KV cache. A failed batch's rows hold a `BackendError`. See
        `alignpipe.synthesis.choice_logprobs` for the tokenization and multi-token answers."""
        from alignpipe.data.chat import format_messages
        from alignpipe.synthesis.choice_logprobs import choice_logprobs

        texts = [format_messages(self.tokenizer, conv) for conv in conversations]
        return choice_logprobs(self.model, self.tokenizer, texts, assistant_prefix, choices, then=then,
                               batch_size=self.batch_size, precision=precision, description=description,
                               error=BackendError)


class LiveModelBackend(TransformersBackend):
    """A model already in memory as a backend: the policy being trained (self-rewarding judges) or, inside
    `context`, its frozen base (adapters disabled). `get_model` is asked at every call, so the backend always
    serves the policy as it is now; nothing is loaded or copied."""

    def __init__(self, get_model: Callable[[], Any], tokenizer: Any, name: str, *, batch_size: int = 16,
                 seed: int = 0, context: Callable[[], contextlib.AbstractContextManager] | None = None):
        self._get_model, self.tokenizer, self.name = get_model, tokenizer, name
        self.batch_size, self.top_p, self.seed, self._calls = batch_size, 1.0, seed, 0
        self._context = context or contextlib.nullcontext

    @property
    def model(self) -> Any:  # read by TransformersBackend's methods
        return self._get_model()

    def complete(self, conversations: list[list[Message]], max_new_tokens: int = 256,
                 temperature: float = 0.0) -> list[str]:
        with self._context():
            return super().complete(conversations, max_new_tokens, temperature)

    def choice_logprobs(self, conversations, assistant_prefix, choices, **kw):  # noqa: ANN001, ANN003, ANN201
        with self._context():
            return super().choice_logprobs(conversations, assistant_prefix, choices, **kw)


@dataclass
class BackendStats:
    requests: int = 0  # HTTP attempts made
    retries: int = 0
    timeouts: int = 0
    failed: int = 0  # conversations that ended as BackendError


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible server (`POST {base_url}/chat/completions`).

    - `base_url` includes the API version prefix, e.g. `http://127.0.0.1:8000/v1`.
    - Up to `concurrency` requests are in flight at once (an asyncio semaphore over one connection pool).
    - Each attempt has a total deadline of `timeout` seconds.
    - HTTP 429, 5xx, timeouts, connection errors, truncated bodies and 200 answers that are not JSON with
      `choices` are retried up to `max_retries` times with exponential backoff (`backoff * 2**attempt`,
      capped at `max_backoff`; a 429's `Retry-After` is honoured up to the cap). Other 4xx answers are not
      retried.
    - The API key is read from the environment variable `api_key_env` at each call and sent as a bearer
      token; without the variable no Authorization header is sent (local servers). It is never stored,
      logged or shown in `repr`.
    - Every conversation gets an answer slot: text, or a `BackendError` naming the last failure and the
      attempts made (e.g. "HTTP 500 after 4 attempts: ..."); one bad conversation never fails the batch.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout: float = 60.0, max_retries: int = 3, backoff: float = 0.5,
                 max_backoff: float = 20.0, name: str | None = None, extra_body: dict | None = None):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.name = name or model
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.extra_body = dict(extra_body or {})
        self.stats = BackendStats()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"OpenAIBackend(url={self.url!r}, model={self.model!r}, concurrency={self.concurrency}, "
                f"timeout={self.timeout}, max_retries={self.max_retries})")

    def _headers(self) -> dict[str, str]:
        return auth_headers(self.api_key_env)

    def _retry(self) -> RetryPolicy:
        return RetryPolicy(self.timeout, self.max_retries, self.backoff, self.max_backoff)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def complete(self, conversations: list[list[Message]], max_new_tokens: int = 256,
                 temperature: float = 0.0) -> list[str]:
        """Synchronous wrapper over `acomplete`; safe to call from inside a running event loop."""
        return run_sync(lambda: self.acomplete(conversations, max_new_tokens, temperature))

    async def acomplete(self, conversations: list[list[Message]], max_new_tokens: int = 256,
                        temperature: float = 0.0) -> list[str]:
        semaphore = asyncio.Semaphore(self.concurrency)
        async with async_client(self.concurrency, self.timeout, self.api_key_env) as client:

            async def one(conv: list[Message]) -> str:
                async with semaphore:
                    return await self._request(client, conv, max_new_tokens, temperature)

            return list(await asyncio.gather(*(one(c) for c in conversations)))

    async def _request(self, client: httpx.AsyncClient, conv: list[Message], max_new_tokens: int,
                       temperature: float) -> str:
        body = {**self.extra_body, "model": self.model, "messages": conv, "max_tokens": max_new_tokens,
                "temperature": temperature}
        try:
            result = await post_with_retries(client, self.url, body, self._retry(), self._count)
            if result.ok:
                return self._parse(result.response)
            reason = result.summary
        except Exception as exc:  # noqa: BLE001 - one conversation's surprise must not fail its whole batch
            log.warning("chat completion raised %s: %s", type(exc).__name__, exc)
            reason = f"client error: {type(exc).__name__}: {exc}"
        self._count(failed=1)
        return BackendError(reason)

    def _parse(self, resp: httpx.Response) -> str:
        try:
            content = resp.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            self._count(failed=1)
            return BackendError(f"malformed response body: {resp.text[:200]!r}")
        if not isinstance(content, str):
            self._count(failed=1)
            return BackendError("response has no text content")
        return content
