"""LLM-as-a-judge on any `TextBackend`: pointwise 1-10, additive 0-5 (Self-Rewarding), pairwise A/B/tie,
and Prometheus-style rubric scoring with named criteria, optionally reference-guided.

Every item yields one `Judgment`, in input order:

- `ok`: a verdict was parsed (`scores`, or `preference` for pairwise; `rationale` is the judge's text);
- `invalid`: the judge's answer could not be parsed after `parse_retries` further attempts
  (`reason` says why the last one failed);
- `error`: the backend could not produce an answer (timeouts, HTTP errors after its own retries,
  generation failures) or the item lacked what the judge needs (a required reference).

`raw` is JSON: `{"attempts": [text, ...]}`, every answer the judge gave for the item in order; with
`samples > 1`, `{"samples": [{"attempts": [...]}, ...]}`. Retries are sampled at `retry_temperature`
when `temperature` is 0 (a greedy judge would repeat itself). `stats` counts outcomes across calls.

Reference-guided judging (every judge): `reference="never"` (default) ignores `Prompt.reference`;
`"auto"` shows it, when present, in a `<reference_answer>` block; `"always"` requires it (an item without
one is an `error` row). It is off by default because `Prompt.reference` may hold unit tests or a rubric
rather than an answer (code tasks): turn it on where the reference is a gold answer.

The prompts and the strict verdict parsers are in `judge_prompts.py`.

Verdict modes: `verdict="generate"` (default) generates an answer and parses it, as above;
`verdict="logprobs"` asks the brief question, pre-fills the verdict line's prefix and reads the
distribution over the allowed answers in one forward pass (`logprob_verdicts.py`; needs a backend with
`choice_logprobs`, i.e. `TransformersBackend`; `precision="auto"` runs it under bf16 autocast where the device has native bf16, else in fp32). Its judges
are named `<kind>[logprobs]:<backend>` so that both modes can be compared side by side.

`hardened=True` renders the prompts with the defences against hostile responses of `judge_prompts.py`
(nonce-tagged blocks, verdict-like claims marked, responses over `max_response_chars` cut in the middle);
such judges are named `<kind>[hardened]:<backend>` (`[logprobs,hardened]`). Attack success rates with and
without it: `attacks.py`, docs/judges.md.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from alignpipe.evaluation import judge_prompts as jp
from alignpipe.evaluation import logprob_verdicts as lv
from alignpipe.evaluation.base import Message, TextBackend
from alignpipe.records import Candidate, Judgment, Prompt
from alignpipe.synthesis.backends import is_backend_error

REFERENCE_MODES = ("never", "auto", "always")


@dataclass
class _Outcome:
    attempts: list[str] = field(default_factory=list)
    parsed: jp.Parsed | None = None
    status: str = "invalid"
    reason: str = ""


class _LLMJudge:
    """Shared machinery: build one conversation per item, query the backend in batches, parse strictly,
    re-ask only the unparsed items, and turn the outcomes into judgments."""

    kind = "llm"
    logprob_verdicts = True  # whether verdict="logprobs" is implemented for this judge

    def __init__(self, backend: TextBackend, *, name: str | None = None, max_new_tokens: int = 512,
                 temperature: float = 0.0, retry_temperature: float = 0.7, parse_retries: int = 2,
                 reference: str = "never", brief: bool = False, verdict: str = "generate",
                 precision: str = "auto", hardened: bool = False, max_response_chars: int = 3000):
        if parse_retries < 0:
            raise ValueError("parse_retries must be >= 0")
        if reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES}, not {reference!r}")
        if verdict not in lv.VERDICTS:
            raise ValueError(f"verdict must be one of {lv.VERDICTS}, not {verdict!r}")
        if precision not in lv.PRECISIONS:
            raise ValueError(f"precision must be one of {lv.PRECISIONS}, not {precision!r}")
        if verdict == "logprobs" and not self.logprob_verdicts:
            raise ValueError(f"{self.kind} has no verdict='logprobs' mode")
        self.backend = backend
        self.verdict = verdict
        self.precision = precision  # for verdict="logprobs": "auto" (bf16 where native), "fp32" or "bf16" (autocast)
        if max_response_chars < 100:
            raise ValueError("max_response_chars must be >= 100")
        # hardened: nonce-tagged blocks, claims in responses marked, long responses cut (judge_prompts.py)
        self.hardened, self.max_response_chars = hardened, max_response_chars
        flags = [f for f, on in (("logprobs", verdict == "logprobs"), ("hardened", hardened)) if on]
        mode = f"[{','.join(flags)}]" if flags else ""
        self.name = name or f"{self.kind}{mode}:{backend.name}"
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.retry_temperature = retry_temperature
        self.parse_retries = parse_retries
        self.reference = reference
        self.brief = brief or verdict == "logprobs"  # verdict line(s) only, no rationale: a few tokens instead of hundreds
        self.stats: Counter[str] = Counter()

    # -- pieces shared by the judges

    def _render(self, kind: str, blocks: list[tuple[str, str]], **fields: str) -> list[Message]:
        return jp.conversation(kind, blocks, self.brief, hardened=self.hardened, max_chars=self.max_response_chars,
                               **fields)

    def _reference_blocks(self, prompt: Prompt) -> list[tuple[str, str]]:
        """The reference block, if this judge uses one; raises ValueError when one is required and absent."""
        if self.reference == "never":
            return []
        if not prompt.reference:
            if self.reference == "always":
                raise ValueError(f"prompt {prompt.id} has no reference answer (judge requires one)")
            return []
        return [("reference_answer", prompt.reference)]

    def _run(self, conversations: list[list[Message] | str], parse: Callable[[str], jp.Parsed]) -> list[_Outcome]:
        """Query, parse, retry the unparsed. A `str` in place of a conversation is a pre-failed item."""
        outcomes = [_Outcome() for _ in conversations]
        pending = []
        for i, conv in enumerate(conversations):
            if isinstance(conv, str):
                outcomes[i].status, outcomes[i].reason = "error", conv
            else:
                pending.append(i)
        for attempt in range(self.parse_retries + 1):
            if not pending:
                break
            if attempt:
                self.stats["parse_retries"] += len(pending)
            temperature = self.temperature if attempt == 0 or self.temperature > 0 else self.retry_temperature
            try:
                texts = self.backend.complete([conversations[i] for i in pending],  # type: ignore[misc]
                                              max_new_tokens=self.max_new_tokens, temperature=temperature)
                if len(texts) != len(pending):
                    raise RuntimeError(f"backend returned {len(texts)} answers for {len(pending)} conversations")
            except Exception as exc:  # noqa: BLE001 - a backend crash is each item's recorded error
                for i in pending:
                    outcomes[i].status, outcomes[i].reason = "error", f"backend failed: {type(exc).__name__}: {exc}"
                break
            still = []
            for i, text in zip(pending, texts, strict=True):
                out = outcomes[i]
                if is_backend_error(text):
                    out.status, out.reason = "error", f"backend: {text}"
                    continue
                out.attempts.append(str(text))
                parsed = parse(str(text))
                if parsed.ok:
                    out.parsed, out.status, out.reason = parsed, "ok", ""
                else:
                    out.reason = f"unparseable judge answer: {parsed.reason}"
                    still.append(i)
            pending = still
        for out in outcomes:
            self.stats[out.status] += 1
        return outcomes

    def _judgment(self, prompt: Prompt, candidate_ids: list[str], out: _Outcome, **kw) -> Judgment:
        j = Judgment(prompt_id=prompt.id, candidate_ids=candidate_ids, judge=self.name,
                     raw=json.dumps({"attempts": out.attempts}), status=out.status, reason=out.reason)
        if out.status == "ok" and out.parsed is not None:
            j.rationale = out.parsed.rationale
            for k, v in kw.items():
                setattr(j, k, v)
        return j


class _ScoringJudge(_LLMJudge):
    """A pointwise judge; `samples > 1` asks several times per item (sample with temperature > 0) and
    averages the valid verdicts per criterion."""

    def __init__(self, backend: TextBackend, *, samples: int = 1, **kw):
        super().__init__(backend, **kw)
        if samples < 1:
            raise ValueError("samples must be >= 1")
        self.samples = samples

    def _conversation(self, prompt: Prompt, candidate: Candidate) -> list[Message]:
        raise NotImplementedError

    def _parse(self, text: str) -> jp.Parsed:
        raise NotImplementedError

    def _scores(self, value: object) -> dict[str, float]:
        return {self.criterion: float(value)}  # type: ignore[attr-defined, arg-type]

    def score(self, items: list[tuple[Prompt, Candidate]]) -> list[Judgment]:
        if self.verdict == "logprobs":
            return lv.score(self, items)
        convs: list[list[Message] | str] = []
        for prompt, cand in items:
            try:
                conv: list[Message] | str = self._conversation(prompt, cand)
            except ValueError as exc:
                conv = str(exc)
            convs.extend([conv] * self.samples)
        outcomes = self._run(convs, self._parse)
        judgments = []
        for n, (prompt, cand) in enumerate(items):
            group = outcomes[n * self.samples : (n + 1) * self.samples]
            if self.samples == 1:
                out = group[0]
                judgments.append(self._judgment(prompt, [cand.id], out, scores=self._scores(out.parsed.value)
                                                if out.status == "ok" else {}))
                continue
            judgments.append(self._merge(prompt, cand, group))
        return judgments

    def _merge(self, prompt: Prompt, cand: Candidate, group: list[_Outcome]) -> Judgment:
        good = [o for o in group if o.status == "ok"]
        raw = json.dumps({"samples": [{"attempts": o.attempts, "status": o.status} for o in group]})
        j = Judgment(prompt_id=prompt.id, candidate_ids=[cand.id], judge=self.name, raw=raw)
        if not good:
            j.status = "error" if any(o.status == "error" for o in group) else "invalid"
            j.reason = f"no valid sample of {len(group)}: {group[-1].reason}"
            return j
        per = [self._scores(o.parsed.value) for o in good]  # type: ignore[union-attr]
        j.scores = {k: sum(s[k] for s in per) / len(per) for k in per[0]}
        j.rationale = good[0].parsed.rationale  # type: ignore[union-attr]
        if len(good) < len(group):
            j.reason = f"{len(good)}/{len(group)} samples valid"
        return j


class PointwiseLLMJudge(_ScoringJudge):
    """One score on an integer scale (default 1..10) per candidate: `scores={criterion: value}`."""

    kind = "llm_pointwise"

    def __init__(self, backend: TextBackend, *, scale: tuple[int, int] = (1, 10), criterion: str = "score", **kw):
        super().__init__(backend, **kw)
        self.lo, self.hi = scale
        if self.lo >= self.hi:
            raise ValueError(f"bad scale {scale}")
        self.criterion = criterion

    def _conversation(self, prompt: Prompt, candidate: Candidate) -> list[Message]:
        blocks = [("instruction", prompt.prompt), *self._reference_blocks(prompt), ("response", candidate.completion)]
        return self._render("pointwise", blocks, lo=str(self.lo), hi=str(self.hi))

    def _parse(self, text: str) -> jp.Parsed:
        return jp.parse_score(text, self.lo, self.hi)


class AdditiveLLMJudge(_ScoringJudge):
    """The Self-Rewarding LM additive rubric: one point per satisfied criterion, 0..5 in total
    (`scores={"additive": points}`). The paper averages 3 sampled verdicts: `samples=3, temperature>0`."""

    kind = "llm_additive"

    def __init__(self, backend: TextBackend, *, criterion: str = "additive", **kw):
        super().__init__(backend, **kw)
        self.criterion = criterion
        self.lo, self.hi = 0, 5

    def _conversation(self, prompt: Prompt, candidate: Candidate) -> list[Message]:
        blocks = [("instruction", prompt.prompt), *self._reference_blocks(prompt), ("response", candidate.completion)]
        return self._render("additive", blocks)

    def _parse(self, text: str) -> jp.Parsed:
        return jp.parse_score(text, 0, 5)


class RubricLLMJudge(_ScoringJudge):
    """Prometheus-style absolute grading on named criteria, each scored 1..5 against level descriptions:
    `scores={criterion.key: score}` (kept separate), `rationale` = the judge's feedback. With
    `reference="auto"` or `"always"` the prompt's `reference` is shown as a score-5 answer."""

    kind = "llm_rubric"

    def __init__(self, backend: TextBackend, criteria: tuple[jp.Criterion, ...] | list[jp.Criterion] = jp.DEFAULT_RUBRIC,
                 **kw):
        super().__init__(backend, **kw)
        if not criteria:
            raise ValueError("a rubric needs at least one criterion")
        keys = [c.key for c in criteria]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate criterion keys in {keys}")
        self.criteria = tuple(criteria)
        self.keys = keys
        self._rubric, self._score_lines = jp.render_rubric(self.criteria)

    def _conversation(self, prompt: Prompt, candidate: Candidate) -> list[Message]:
        blocks = [("instruction", prompt.prompt), ("response", candidate.completion), *self._reference_blocks(prompt)]
        return self._render("rubric", blocks, rubric=self._rubric, score_lines=self._score_lines)

    def _parse(self, text: str) -> jp.Parsed:
        return jp.parse_rubric(text, self.keys)

    def _scores(self, value: object) -> dict[str, float]:
        return {k: float(v) for k, v in value.items()}  # type: ignore[attr-defined]


class PairwiseLLMJudge(_LLMJudge):
    """Which of two candidates is better: `preference` in {"first", "second", "tie"} with
    `candidate_ids=[first.id, second.id]`; the first candidate is shown as Response A. One order only:
    wrap it in `bias.BothOrdersJudge` to control position bias."""

    kind = "llm_pairwise"

    def _conversation(self, prompt: Prompt, first: Candidate, second: Candidate) -> list[Message]:
        blocks = [("instruction", prompt.prompt), *self._reference_blocks(prompt),
                  ("response_a", first.completion), ("response_b", second.completion)]
        return self._render("pairwise", blocks)

    def compare(self, items: list[tuple[Prompt, Candidate, Candidate]]) -> list[Judgment]:
        if self.verdict == "logprobs":
            return lv.compare(self, items)
        convs: list[list[Message] | str] = []
        for prompt, a, b in items:
            try:
                convs.append(self._conversation(prompt, a, b))
            except ValueError as exc:
                convs.append(str(exc))
        outcomes = self._run(convs, jp.parse_verdict)
        return [self._judgment(p, [a.id, b.id], out, preference=out.parsed.value if out.parsed else None)
                for (p, a, b), out in zip(items, outcomes, strict=True)]
