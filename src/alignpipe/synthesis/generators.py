"""One interface for every way of sampling responses: `Generator.sample(prompts, k, ...)`.

Backends (`synthesis.backend`, built by `build_generator`):
- `transformers`: a model in this process (already in memory, or loaded from a directory); k samples per
  prompt share one prefill of the prompt (`shared_prefill.py`);
- `openai`: any OpenAI-compatible server (vLLM, SGLang, llama.cpp), `n` samples per request
  (`openai_generator.py`);
- `vllm`: in-process vLLM on a CUDA GPU, the round's LoRA adapter as a `LoRARequest` (`vllm_generator.py`).

Every backend returns k candidates per prompt, in prompt order then sample index, ids
`{prompt.id}/{id_prefix}{j}`, and records in `Candidate.source` at least the caller's source name
(`source["source"]`), `backend`, `model`, `temperature` and `top_p`, plus whatever else the caller put in
`source` (the round, ...).

A sample that could not be produced (a server that kept failing) is not an exception: it is returned as a
candidate with completion "", `num_tokens=0`, `truncated=False` and `source["error"]` = the reason, so the
output shape stays k per prompt and the caller decides; `drop_failed` removes and counts them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from alignpipe import AlignpipeError
from alignpipe.records import Candidate, Prompt


@runtime_checkable
class Generator(Protocol):
    name: str

    def sample(self, prompts: list[Prompt], k: int, *, temperature: float, top_p: float, max_new_tokens: int,
               seed: int, source: dict, description: str = "sampling") -> list[Candidate]:
        """k candidates per prompt (temperature 0: greedy); same seed, same backend state: same samples
        where the backend can promise it (a server may not)."""
        ...


def source_record(source: dict, backend: str, model: str, temperature: float, top_p: float) -> dict[str, Any]:
    """`Candidate.source` of a sample: the caller's fields plus backend, model and sampling parameters."""
    if not isinstance(source.get("source"), str):
        raise ValueError(f"source must name the candidates' source as source['source'], got {source!r}")
    return {**source, "backend": backend, "model": model, "temperature": temperature, "top_p": top_p}


def failed_candidate(prompt: Prompt, cid: str, source: dict[str, Any], reason: str) -> Candidate:
    return Candidate(prompt_id=prompt.id, id=cid, completion="", source={**source, "error": reason},
                     num_tokens=0, truncated=False)


def drop_failed(candidates: list[Candidate]) -> tuple[list[Candidate], int]:
    """The candidates that were produced, and how many were dropped for a backend failure."""
    kept = [c for c in candidates if "error" not in c.source]
    return kept, len(candidates) - len(kept)


class TransformersGenerator:
    """Sampling from a transformers model in this process, k samples per prompt from one shared prefill.

    `model` is a model object already in memory (the policy being trained: it is sampled as it is at each
    call; pass its `tokenizer`) or a local model directory (loaded once, with an optional peft `adapter`).
    `batch_size` counts output rows (prompts x k)."""

    def __init__(self, model: Any, tokenizer: Any = None, *, adapter: str | Path | None = None,
                 batch_size: int = 64, shared_prefill: bool = True, model_name: str | None = None,
                 id_prefix: str = "", name: str = "transformers", device: str | None = None) -> None:
        if isinstance(model, str | Path):
            from alignpipe.models import load_policy, load_tokenizer, resolve_model_path

            path = resolve_model_path(str(model))
            if adapter is not None and not Path(adapter).is_dir():
                raise AlignpipeError(f"adapter directory does not exist: {adapter}")
            self.model, self.tokenizer = load_policy(path, adapter), tokenizer or load_tokenizer(path)
            self.model_name = model_name or str(path)
        else:
            if tokenizer is None:
                raise ValueError("a model object needs its tokenizer")
            self.model, self.tokenizer = model, tokenizer
            self.model_name = model_name or str(getattr(model, "name_or_path", "") or type(model).__name__)
        if device is not None:
            self.model.to(device)
        self.batch_size, self.shared_prefill, self.id_prefix, self.name = batch_size, shared_prefill, id_prefix, name

    def sample(self, prompts: list[Prompt], k: int, *, temperature: float, top_p: float, max_new_tokens: int,
               seed: int, source: dict, description: str = "sampling") -> list[Candidate]:
        from alignpipe.synthesis.transformers_backend import generate

        record = source_record(source, self.name, self.model_name, temperature, top_p)
        out = generate(self.model, self.tokenizer, prompts, k, temperature, top_p, max_new_tokens, self.batch_size,
                       seed, record, description, shared_prefill=self.shared_prefill)
        if self.id_prefix:
            for c in out:
                c.id = f"{c.prompt_id}/{self.id_prefix}{c.id.rsplit('/', 1)[1]}"
        return out


def _openai(**options: Any) -> Generator:
    from alignpipe.synthesis.openai_generator import OpenAIGenerator

    return OpenAIGenerator(**options)


def _vllm(**options: Any) -> Generator:
    from alignpipe.synthesis.vllm_generator import VLLMGenerator

    return VLLMGenerator(**options)


BACKENDS: dict[str, Callable[..., Generator]] = {"transformers": TransformersGenerator, "openai": _openai,
                                                 "vllm": _vllm}


def check_backend_available(backend: str) -> str | None:
    """Why `backend` cannot run on this machine, or None when it can (checked at recipe load time, before
    any model is loaded). `offline` (the config's older spelling of `synthesis.source: offline`) needs no
    generator and is accepted here."""
    if backend == "offline":
        return None
    if backend not in BACKENDS:
        return f"unknown synthesis backend {backend!r} (known: {', '.join(sorted(BACKENDS))})"
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            return "the vllm package is not installed (pip install vllm)"
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


def build_generator(backend: str, **options: Any) -> Generator:
    """The generator of `backend` ("transformers", "openai" or "vllm"), built from the backend's options:
    transformers: `model` (object + `tokenizer`, or a directory), `batch_size`, `shared_prefill`, ...;
    openai: `base_url`, `model`, `api_key_env`, `concurrency`, ...; vllm: `model`, `adapter`, ...."""
    if backend not in BACKENDS:
        raise AlignpipeError(f"unknown synthesis.backend {backend!r}; known backends: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[backend](**options)
