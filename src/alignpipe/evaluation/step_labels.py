"""Math-Shepherd step labels: process supervision for math solutions from Monte-Carlo rollouts.

Math-Shepherd (Wang et al., arXiv 2312.08935) labels step `s_i` of a solution by how often a "completer"
model, continuing from the prefix `(q, s_1..s_i)`, reaches the gold answer `a*`. With N continuations
whose final answers are `a_1..a_N`:

- hard estimate: `y_HE(s_i) = 1` if any `a_j == a*`, else 0 (the paper's main setting);
- soft estimate: `y_SE(s_i) = (1/N) * sum_j 1[a_j == a*]`.

`StepLabeler` (a pointwise judge: `name`, `score(items)`) returns one `Judgment` per candidate:

- `steps`: one label per step, hard or soft (`estimate=`);
- `scores`: `{"correct": outcome, "min_step": min(steps)}`, `correct` being whether the candidate's own
  final answer matches `Prompt.reference` (`math_verifier`), and `min_step` the paper's reranking score;
- `raw`: JSON `{"estimate", "rollouts", "answer", "steps": [{"text", "n", "correct", "errors", "hard",
  "soft", "by"}, ...]}`: per step the number of valid rollouts, how many reached the gold answer, how many
  the backend failed, and whether the label came from `rollouts` or from the `outcome`;
- `status`: `error` when the prompt has no reference or a step got no valid rollout (its label is then
  NaN and there are no scores); `invalid` for an empty solution.

Step rule (`step_spans`): the steps are the non-blank lines of the solution; a solution on one line is
split into sentences instead (`atomic.sentence_spans`). The prefix handed to the completer is the solution
text up to the end of the step, plus the line break(s) that follow it (not trailing spaces), so a
continuation starts at the next step exactly as the model would write it.

The last step is labelled by the outcome (its prefix is the whole solution: a rollout would only repeat the
candidate's own answer), unless the candidate was truncated or `last_step="rollouts"`.

A rollout's answer is the final answer (`math_verifier.extract_answer`) of prefix + continuation: the
completed solution. Rollouts go to the completer as one flat list (candidate, then step, then sample),
`batch_size` per call, with a progress bar.

Completers: a `TransformersBackend` (or a policy `(model, tokenizer)` via `PolicyCompleter`) continues the
assistant turn for real: the conversation is rendered with the chat template and a generation prompt, the
prefix text is appended, and generation goes on from there. Any other `TextBackend` is sent the
conversation with the prefix as a final assistant message and must continue that message (vLLM / SGLang:
`OpenAIBackend(..., extra_body={"continue_final_message": True, "add_generation_prompt": False})`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from alignpipe.evaluation.atomic import sentence_spans
from alignpipe.evaluation.base import Message, TextBackend
from alignpipe.evaluation.math_verifier import VerificationError, answers_match, extract_answer
from alignpipe.progress import progress
from alignpipe.records import Candidate, Judgment, Prompt
from alignpipe.synthesis.backends import BackendError, is_backend_error

ESTIMATES = ("hard", "soft")


# ---------------------------------------------------------------- steps


def step_spans(solution: str) -> list[tuple[int, int]]:
    """(start, end) offsets of the steps: the non-blank lines, or the sentences of a one-line solution."""
    lines, offset = [], 0
    for line in solution.splitlines(keepends=True):
        body = line.strip()
        if body:
            start = offset + line.index(body[0])
            lines.append((start, start + len(body)))
        offset += len(line)
    return lines if len(lines) != 1 else sentence_spans(solution)


def split_steps(solution: str) -> list[str]:
    """The steps of a solution, by the rule of `step_spans`."""
    return [solution[a:b] for a, b in step_spans(solution)]


def step_prefixes(solution: str, spans: list[tuple[int, int]]) -> list[str]:
    """For each step, the solution up to the end of that step plus the line break(s) after it."""
    out = []
    for _, end in spans:
        tail = solution[end:]
        gap = tail[: len(tail) - len(tail.lstrip())]
        out.append(solution[:end] + gap.rstrip(" \t"))
    return out


# ---------------------------------------------------------------- completers


class Completer(Protocol):
    """Continues partial assistant answers: one continuation (the new text only) per (conversation, prefix)."""

    name: str

    def continue_prefixes(self, requests: list[tuple[list[Message], str]], max_new_tokens: int,
                          temperature: float) -> list[str]: ...


class PolicyCompleter:
    """Continuation with a local causal LM: chat template with a generation prompt, then the prefix text,
    then generation (batched and left-padded like `TransformersBackend`; sampling seeded from `seed` and
    the call count). A batch that fails yields `BackendError`s for its rows."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 16, top_p: float = 1.0, seed: int = 0,
                 name: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.top_p, self.seed = batch_size, top_p, seed
        self.name = name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or "policy")
        self._calls = 0

    def render(self, messages: list[Message], prefix: str) -> str:
        """The exact text the model continues: the conversation with its generation prompt, then the prefix."""
        from alignpipe.data.chat import format_messages

        return format_messages(self.tokenizer, messages) + prefix

    def continue_ids(self, texts: list[str], max_new_tokens: int, temperature: float) -> list[list[int] | str]:
        """New token ids (before EOS) per rendered text, or a `BackendError` for rows of a failed batch."""
        from alignpipe.synthesis.backends import seeded_generation

        was_training, calls = self.model.training, self._calls
        self._calls += 1
        self.model.eval()
        try:
            return seeded_generation(self.model, self.tokenizer, texts, max_new_tokens, temperature, self.top_p,
                                     self.batch_size, self.seed + calls)
        finally:
            self.model.train(was_training)

    def continue_prefixes(self, requests: list[tuple[list[Message], str]], max_new_tokens: int,
                          temperature: float) -> list[str]:
        texts = [self.render(messages, prefix) for messages, prefix in requests]
        return [ids if isinstance(ids, str) else self.tokenizer.decode(ids, skip_special_tokens=True)
                for ids in self.continue_ids(texts, max_new_tokens, temperature)]


class TextCompleter:
    """Continuation through a chat `TextBackend`: the prefix is sent as a final assistant message, which the
    backend must continue (see the module docstring for vLLM / SGLang)."""

    def __init__(self, backend: TextBackend):
        self.backend = backend
        self.name = backend.name

    def continue_prefixes(self, requests: list[tuple[list[Message], str]], max_new_tokens: int,
                          temperature: float) -> list[str]:
        convs = [[*messages, {"role": "assistant", "content": prefix}] for messages, prefix in requests]
        return self.backend.complete(convs, max_new_tokens=max_new_tokens, temperature=temperature)


def as_completer(generator: Any) -> Completer:
    """A completer for: a completer (as is), a `TransformersBackend` (its model, real continuation), or any
    other `TextBackend` (`TextCompleter`)."""
    if callable(getattr(generator, "continue_prefixes", None)):
        return generator
    if getattr(generator, "model", None) is not None and getattr(generator, "tokenizer", None) is not None:
        return PolicyCompleter(generator.model, generator.tokenizer, batch_size=getattr(generator, "batch_size", 16),
                               top_p=getattr(generator, "top_p", 1.0), seed=getattr(generator, "seed", 0),
                               name=getattr(generator, "name", None))
    if callable(getattr(generator, "complete", None)):
        return TextCompleter(generator)
    raise TypeError(f"cannot continue solutions with {type(generator).__name__}: need a TextBackend, a "
                    "TransformersBackend or a completer")


def conversation_of(prompt: Prompt) -> list[Message]:
    """The conversation before the assistant's answer: `meta["messages"]` when present, else the prompt."""
    return list(prompt.meta.get("messages") or [{"role": "user", "content": prompt.prompt}])


# ---------------------------------------------------------------- the labeller


@dataclass
class _Step:
    text: str
    prefix: str
    by: str  # "rollouts" or "outcome"
    n: int = 0
    correct: int = 0
    errors: int = 0


@dataclass
class _Plan:
    prompt: Prompt
    candidate: Candidate
    answer: str | None = None
    outcome: float = 0.0
    steps: list[_Step] = field(default_factory=list)
    failure: tuple[str, str] | None = None  # (status, reason) decided before any rollout


class StepLabeler:
    """Math-Shepherd step labels for math candidates (see the module docstring).

    `generator`: the completer model (`TransformersBackend`, `TextBackend`, or a `Completer`);
    `rollouts`: N continuations per step (paper: 8); `estimate`: "hard" or "soft" labels in `steps`;
    `temperature`, `max_new_tokens`: rollout sampling; `batch_size`: rollouts per completer call;
    `last_step`: "outcome" (default) or "rollouts"; `splitter`: step spans of a solution (`step_spans`).
    """

    def __init__(self, generator: Any, *, rollouts: int = 8, estimate: str = "hard", temperature: float = 0.7,
                 max_new_tokens: int = 256, batch_size: int = 64, last_step: str = "outcome",
                 splitter: Callable[[str], list[tuple[int, int]]] = step_spans, name: str | None = None,
                 show_progress: bool = True):
        if estimate not in ESTIMATES:
            raise ValueError(f"estimate must be one of {ESTIMATES}, not {estimate!r}")
        if last_step not in ("outcome", "rollouts"):
            raise ValueError(f"last_step must be 'outcome' or 'rollouts', not {last_step!r}")
        if rollouts < 1 or batch_size < 1:
            raise ValueError("rollouts and batch_size must be >= 1")
        if rollouts > 1 and temperature == 0:
            raise ValueError("rollouts > 1 at temperature 0 would repeat one greedy continuation; sample instead")
        self.completer = as_completer(generator)
        self.rollouts, self.estimate, self.temperature = rollouts, estimate, temperature
        self.max_new_tokens, self.batch_size, self.last_step = max_new_tokens, batch_size, last_step
        self.splitter, self.show_progress = splitter, show_progress
        self.name = name or f"step_labels:{self.completer.name}"

    def _plan(self, prompt: Prompt, cand: Candidate) -> _Plan:
        plan = _Plan(prompt, cand)
        if prompt.reference is None:
            plan.failure = ("error", "prompt has no reference answer")
            return plan
        spans = self.splitter(cand.completion)
        if not spans:
            plan.failure = ("invalid", "empty solution: no steps")
            return plan
        plan.answer = extract_answer(cand.completion)
        try:
            plan.outcome = float(plan.answer is not None and answers_match(plan.answer, prompt.reference))
        except VerificationError as exc:  # undecidable (timed out, refused): an error, not a guessed 0/1
            plan.failure = ("error", exc.reason)
            return plan
        prefixes = step_prefixes(cand.completion, spans)
        for k, ((a, b), prefix) in enumerate(zip(spans, prefixes, strict=True)):
            last = k == len(spans) - 1 and self.last_step == "outcome" and not cand.truncated
            plan.steps.append(_Step(cand.completion[a:b], prefix, "outcome" if last else "rollouts"))
        return plan

    def score(self, items: list[tuple[Prompt, Candidate]]) -> list[Judgment]:
        plans = [self._plan(p, c) for p, c in items]
        requests: list[tuple[list[Message], str]] = []
        owners: list[tuple[_Plan, _Step]] = []
        for plan in plans:
            for step in plan.steps:
                if step.by == "rollouts":
                    conv = conversation_of(plan.prompt)
                    for _ in range(self.rollouts):
                        requests.append((conv, step.prefix))
                        owners.append((plan, step))
        self._roll(requests, owners)
        return [self._judgment(plan) for plan in plans]

    def _roll(self, requests: list[tuple[list[Message], str]], owners: list[tuple[_Plan, _Step]]) -> None:
        """Run the rollouts, `batch_size` per completer call, and count correct answers per step."""
        if not requests:
            return
        bar = progress() if self.show_progress else None
        task = bar.add_task(f"step labels ({self.completer.name})", total=len(requests), info="") if bar else None
        if bar:
            bar.start()
        try:
            for start in range(0, len(requests), self.batch_size):
                chunk = requests[start : start + self.batch_size]
                try:
                    texts = self.completer.continue_prefixes(chunk, self.max_new_tokens, self.temperature)
                    if len(texts) != len(chunk):
                        raise RuntimeError(f"completer returned {len(texts)} texts for {len(chunk)} prefixes")
                except Exception as exc:  # noqa: BLE001 - a failed call is counted per rollout, never raised
                    texts = [BackendError(f"{type(exc).__name__}: {exc}")] * len(chunk)
                mine = owners[start : start + len(chunk)]
                for (plan, step), (_, prefix), text in zip(mine, chunk, texts, strict=True):
                    if is_backend_error(text):
                        step.errors += 1
                        continue
                    answer = extract_answer(prefix + str(text))
                    try:
                        right = answer is not None and answers_match(answer, plan.prompt.reference or "")
                    except VerificationError:  # an undecidable rollout counts like a failed call
                        step.errors += 1
                        continue
                    step.n += 1
                    step.correct += int(right)
                if bar and task is not None:
                    bar.update(task, advance=len(chunk))
        finally:
            if bar:
                bar.stop()

    def _judgment(self, plan: _Plan) -> Judgment:
        j = Judgment(prompt_id=plan.prompt.id, candidate_ids=[plan.candidate.id], judge=self.name)
        if plan.failure:
            j.status, j.reason = plan.failure
            return j
        hard, soft = [], []
        for step in plan.steps:
            if step.by == "outcome":
                hard.append(plan.outcome)
                soft.append(plan.outcome)
            elif step.n == 0:
                hard.append(math.nan)
                soft.append(math.nan)
            else:
                hard.append(float(step.correct > 0))
                soft.append(step.correct / step.n)
        labels = hard if self.estimate == "hard" else soft
        j.steps = labels
        j.raw = json.dumps({"estimate": self.estimate, "rollouts": self.rollouts, "answer": plan.answer, "steps": [
            {"text": s.text, "n": s.n, "correct": s.correct, "errors": s.errors,
             "hard": None if math.isnan(h) else h, "soft": None if math.isnan(v) else v, "by": s.by}
            for s, h, v in zip(plan.steps, hard, soft, strict=True)]})
        failed = [k for k, s in enumerate(plan.steps, start=1) if s.by == "rollouts" and s.n == 0]
        if failed:
            j.status = "error"
            j.reason = f"no valid rollout for step(s) {failed}"
            return j
        j.scores = {"correct": plan.outcome, "min_step": min(labels)}
        j.rationale = (f"final answer {plan.answer!r}, reference {plan.prompt.reference!r}; "
                       f"{self.estimate} step labels {[round(v, 3) for v in labels]}")
        if plan.answer is None:
            j.reason = "no final answer in the solution"
        return j


def label_steps(generator: Any, prompts: list[Prompt], candidates: list[Candidate], **options: Any) -> list[Judgment]:
    """Step-labelled judgments for `candidates` (in their order), with `StepLabeler(generator, **options)`."""
    by_id = {p.id: p for p in prompts}
    return StepLabeler(generator, **options).score([(by_id[c.prompt_id], c) for c in candidates])
