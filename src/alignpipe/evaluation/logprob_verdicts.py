"""Logprob verdicts (`verdict="logprobs"`) for the LLM judges: no sampling, no parsing, never invalid.

The judge asks its brief question, pre-fills the assistant turn with the verdict line's prefix and reads
the model's next-token distribution restricted to the allowed answers, renormalised over them, in one
forward pass (`backend.choice_logprobs`, implemented by `TransformersBackend`):

- pairwise: prefix `Verdict:`, answers ` A` / ` B` / ` tie`; `scores = {"p_first", "p_second", "p_tie"}`
  (sum 1), `preference` = the most probable (ties broken in that order);
- pointwise (1..10) and additive (0..5): prefix `Score:`, answers the integers of the scale; the score is
  G-Eval's probability-weighted mean `sum_k k * P(k)` (arXiv 2303.16634), `scores = {criterion: mean}`.
  With digit-by-digit tokenizers (SmolLM2: `10` is `1 0`) the backend reads `P(10) = P(1) * P(0 | 1)` with
  one extra one-token forward on the KV cache, and `P(1) = P(1) * (1 - P(0 | 1))`: a leading digit that is
  not continued into an allowed number keeps its mass (so `1` then `5` counts as 1, as `2` then `5`
  counts as 2: every answer is read from its first digit, except that `1 0` is 10);
- rubric: prefix `Score (<first key>):`, answers 1..5; the most probable value is written and the next
  criterion's prefix appended, on the KV cache (about one prompt forward for all criteria); per criterion
  the probability-weighted mean is the score.

`raw` is JSON: `{"verdict": "logprobs", "prefix": ..., "probs": {answer: p}, "mass": m}` with `mass` the
probability the model gave the allowed answers before renormalising (low mass: the model wanted to say
something else); the rubric has one such entry per criterion under `"criteria"`. A backend without
`choice_logprobs` (e.g. `OpenAIBackend`) gives `error` rows. `samples` is ignored (the verdict is exact).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from alignpipe.precision import PRECISIONS  # noqa: F401 - judge options name these
from alignpipe.records import Candidate, Judgment, Prompt
from alignpipe.synthesis.backends import is_backend_error

VERDICTS = ("generate", "logprobs")
PAIRWISE = {" A": "first", " B": "second", " tie": "tie"}


def renormalise(logprobs: dict[str, float]) -> tuple[dict[str, float], float]:
    """Probabilities over the given answers (summing to 1) and the mass they had before."""
    top = max(logprobs.values())
    weights = {k: math.exp(v - top) for k, v in logprobs.items()}
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items()}, math.exp(top) * total


def expected(probs: dict[int, float]) -> float:
    """G-Eval's probability-weighted score."""
    return sum(k * p for k, p in probs.items())


def argmax(probs: dict[Any, float]) -> Any:
    """The most probable answer; the first one listed on equal probabilities."""
    return max(probs, key=lambda k: probs[k])


def _ask(judge: Any, conversations: list[list[dict[str, str]] | str], prefix: str, choices: list[str],
         then: Callable[[int, int, dict[str, float]], str | None] | None = None) -> list[list[dict[str, float]] | str]:
    """Per conversation, its steps' log-prob dicts, or a reason string (pre-failed item, missing method,
    backend failure)."""
    out: list[list[dict[str, float]] | str] = [c if isinstance(c, str) else "" for c in conversations]
    todo = [i for i, c in enumerate(conversations) if not isinstance(c, str)]
    method = getattr(judge.backend, "choice_logprobs", None)
    if not callable(method):
        reason = (f"backend {judge.backend.name} has no choice_logprobs: verdict='logprobs' needs a local "
                  "transformers backend (use verdict='generate' with a server)")
        return [out[i] if isinstance(conversations[i], str) else reason for i in range(len(out))]
    if not todo:
        return out
    remap = (lambda row, step, lp: then(todo[row], step, lp)) if then is not None else None
    try:
        res = method([conversations[i] for i in todo], prefix, choices, then=remap, precision=judge.precision,
                     description=judge.name)
        if len(res) != len(todo):
            raise RuntimeError(f"backend returned {len(res)} results for {len(todo)} conversations")
    except Exception as exc:  # noqa: BLE001 - a backend crash is each item's recorded error
        res = [f"backend failed: {type(exc).__name__}: {exc}"] * len(todo)
    for i, r in zip(todo, res, strict=True):
        out[i] = f"backend: {r}" if is_backend_error(r) else r
    return out


def _row(judge: Any, prompt: Prompt, ids: list[str], result: list[dict[str, float]] | str,
         build: Callable[[list[dict[str, float]]], tuple[dict, dict[str, Any]]]) -> Judgment:
    j = Judgment(prompt_id=prompt.id, candidate_ids=ids, judge=judge.name)
    if isinstance(result, str):
        j.status, j.reason = "error", result
    else:
        try:
            raw, fields = build(result)
        except (KeyError, ValueError, RuntimeError) as exc:  # a malformed backend answer is this row's error
            j.status, j.reason = "error", f"bad choice log-probs: {type(exc).__name__}: {exc}"
        else:
            j.raw = json.dumps({"verdict": "logprobs", **raw})
            for k, v in fields.items():
                setattr(j, k, v)
    judge.stats[j.status] += 1
    return j


def compare(judge: Any, items: list[tuple[Prompt, Candidate, Candidate]]) -> list[Judgment]:
    """Pairwise logprob verdicts (see the module docstring)."""
    convs: list[list[dict[str, str]] | str] = []
    for prompt, a, b in items:
        try:
            convs.append(judge._conversation(prompt, a, b))
        except ValueError as exc:
            convs.append(str(exc))
    results = _ask(judge, convs, "Verdict:", list(PAIRWISE))

    def build(steps: list[dict[str, float]]) -> tuple[dict, dict[str, Any]]:
        probs, mass = renormalise(steps[0])
        named = {PAIRWISE[k]: p for k, p in probs.items()}
        return ({"prefix": "Verdict:", "probs": probs, "mass": mass},
                {"preference": argmax(named), "scores": {f"p_{k}": p for k, p in named.items()}})

    return [_row(judge, p, [a.id, b.id], r, build) for (p, a, b), r in zip(items, results, strict=True)]


def _scale(steps_lp: dict[str, float], values: list[int]) -> tuple[dict[int, float], float]:
    probs, mass = renormalise(steps_lp)
    return {v: probs[f" {v}"] for v in values}, mass


def score(judge: Any, items: list[tuple[Prompt, Candidate]]) -> list[Judgment]:
    """Pointwise / additive / rubric logprob verdicts (see the module docstring)."""
    convs: list[list[dict[str, str]] | str] = []
    for prompt, cand in items:
        try:
            convs.append(judge._conversation(prompt, cand))
        except ValueError as exc:
            convs.append(str(exc))
    if hasattr(judge, "keys"):
        return _rubric(judge, items, convs)
    values = list(range(judge.lo, judge.hi + 1))
    results = _ask(judge, convs, "Score:", [f" {v}" for v in values])

    def build(steps: list[dict[str, float]]) -> tuple[dict, dict[str, Any]]:
        probs, mass = _scale(steps[0], values)
        return ({"prefix": "Score:", "probs": probs, "mass": mass, "argmax": argmax(probs)},
                {"scores": {judge.criterion: expected(probs)}})

    return [_row(judge, p, [c.id], r, build) for (p, c), r in zip(items, results, strict=True)]


def rubric_prefix(keys: list[str], chosen: list[int]) -> str:
    """The assistant text before criterion `len(chosen)`'s value: earlier criteria with their values."""
    done = "".join(f"Score ({k}): {v}\n" for k, v in zip(keys, chosen, strict=False))
    return done + f"Score ({keys[len(chosen)]}):"


def _rubric(judge: Any, items: list[tuple[Prompt, Candidate]],
            convs: list[list[dict[str, str]] | str]) -> list[Judgment]:
    keys, values = list(judge.keys), [1, 2, 3, 4, 5]
    chosen: list[list[int]] = [[] for _ in items]

    def then(row: int, step: int, lp: dict[str, float]) -> str | None:
        chosen[row].append(argmax(_scale(lp, values)[0]))
        return rubric_prefix(keys, chosen[row]) if step + 1 < len(keys) else None

    results = _ask(judge, convs, rubric_prefix(keys, []), [f" {v}" for v in values], then)

    def build(steps: list[dict[str, float]]) -> tuple[dict, dict[str, Any]]:
        if len(steps) != len(keys):
            raise RuntimeError(f"backend gave {len(steps)} steps for {len(keys)} criteria")
        crit, scores = {}, {}
        for k, lp in zip(keys, steps, strict=True):
            probs, mass = _scale(lp, values)
            crit[k] = {"probs": probs, "mass": mass, "argmax": argmax(probs)}
            scores[k] = expected(probs)
        return {"prefix": rubric_prefix(keys, []), "criteria": crit}, {"scores": scores}

    return [_row(judge, p, [c.id], r, build) for (p, c), r in zip(items, results, strict=True)]
