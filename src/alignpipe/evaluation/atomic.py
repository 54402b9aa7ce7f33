"""Atomic (sentence-level) scoring of long answers: one LLM verdict per sentence, read in context.

A long answer is rarely all right or all wrong. Following the atomic-fact view of FActScore (Min et al.,
arXiv 2305.14251), the answer is cut into sentences and each sentence is judged on its own, with the
instruction and the whole response shown as context. The per-sentence scores go to `Judgment.steps`
(in sentence order) and their aggregate to `Judgment.scores`: `{"sentence_mean": ..., "sentence_min": ...}`.

Sentence rule (`split_sentences`, `sentence_spans`):

- a line break always ends a sentence, and blank lines are dropped (answers are not hard-wrapped; list
  items, headings and equations stand on lines of their own);
- within a line, a sentence ends at `.`, `!` or `?` (a run of them, then any closing quotes or brackets)
  that is followed by whitespace and then by an uppercase letter, a digit, an opening quote or bracket,
  `$` or `\\`; a lowercase next word never starts a sentence;
- a single `.` does not end a sentence after a known abbreviation (`Dr.`, `Mr.`, `vs.`, `e.g.`, `approx.`,
  ...), after `No.` / `Fig.` / `Eq.` / `p.` and similar when a number follows, after a dotted acronym
  (`U.S.`, `i.e.`, `a.m.`, `Ph.D.`), after a single capital (an initial, `J. Smith`), or when the text before
  it is only a list marker (`1.`, `a.`, `iv.`);
- decimals (`3.14`), version numbers and URLs never break: the dot is not followed by whitespace.

Known limits: an acronym or abbreviation that really ends a sentence (`... in the U.S. Then ...`) does not
split; `etc.` does split when a capital follows.

The judge (`AtomicLLMJudge`) reuses the LLM-judge machinery (`llm_judge._LLMJudge`): the material is in
tagged blocks (`<instruction>`, `<response>`, the sentence under judgment in `<sentence>`), tags inside the
material are neutralised, the verdict is a strict `Score: <n>` line (`judge_prompts.parse_score`, after
removing any echoed `<sentence>` block), unparsed answers are re-asked `parse_retries` times, and each
sentence's outcome is `ok`, `invalid` or `error`. `stats` counts those outcomes per sentence.

A candidate's judgment is `ok` only when every sentence was scored (or, with `allow_partial=True`, at
least one was: the aggregate is then over the scored sentences and `reason` says how many). Otherwise it
is `error` if any sentence hit a backend error, else `invalid`, with no `scores`. `steps` always has one
entry per sentence, NaN where that sentence has no score. `raw` is JSON:
`{"sentences": [{"text", "status", "score", "reason", "attempts"}, ...]}`.
"""

from __future__ import annotations

import json
import math
import re

from alignpipe.evaluation import judge_prompts as jp
from alignpipe.evaluation.base import Message, TextBackend
from alignpipe.evaluation.llm_judge import _LLMJudge, _Outcome
from alignpipe.records import Candidate, Judgment, Prompt

# ---------------------------------------------------------------- sentence splitting

ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "gen", "col", "lt", "sgt", "capt", "rev", "hon",
    "vs", "cf", "approx", "dept", "inc", "ltd", "co", "corp", "al", "ca",
})
# Abbreviations that are only taken as such when a number follows ("No. 5", "Fig. 3", "Jan. 12").
NUMBERED = frozenset({
    "no", "nos", "fig", "figs", "eq", "eqs", "vol", "p", "pp", "ch", "sec", "art", "ref", "tab", "op",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
})
_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s)")
_OPENERS = "\"'\u201c\u2018([{$\\*`"
_ACRONYM = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")  # "U.S" / "e.g" / "Ph.D" (the final dot is the candidate)
_LIST_MARKER = re.compile(r"[-*\u2022]?\s*[(\[]?(?:\d{1,3}|[A-Za-z]|[ivxlcIVXLC]{1,4})")


def _starts_sentence(char: str) -> bool:
    return char.isupper() or char.isdigit() or char in _OPENERS


def _not_an_end(before: str, rest: str) -> bool:
    """Whether a single '.' after `before` (the sentence so far) is an abbreviation or list-marker dot."""
    if _LIST_MARKER.fullmatch(before.strip()):
        return True
    words = before.split()
    if not words:
        return True
    word = words[-1].lstrip("\"'\u201c\u2018([{")
    low = word.lower()
    return (low in ABBREVIATIONS or (low in NUMBERED and rest[:1].isdigit())
            or bool(_ACRONYM.fullmatch(word)) or (len(word) == 1 and word.isupper()))


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of the sentences of `text` by the module's rule; surrounding whitespace and
    blank lines excluded."""
    spans: list[tuple[int, int]] = []
    offset = 0
    for line in text.splitlines(keepends=True):
        start = 0
        for m in _END.finditer(line):
            rest = line[m.end():].lstrip()
            if not rest or not _starts_sentence(rest[0]):
                continue
            if m.group().rstrip("\"'\u201d\u2019)]") == "." and _not_an_end(line[start:m.start()], rest):
                continue
            spans.append((offset + start, offset + m.end()))
            start = m.end()
        spans.append((offset + start, offset + len(line)))
        offset += len(line)
    return _strip(text, spans)


def _strip(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for a, b in spans:
        piece = text[a:b]
        lead = len(piece) - len(piece.lstrip())
        trail = len(piece) - len(piece.rstrip())
        if a + lead < b - trail:
            out.append((a + lead, b - trail))
    return out


def split_sentences(text: str) -> list[str]:
    """The sentences of `text` (see the module docstring for the rule), stripped, blank ones dropped."""
    return [text[a:b] for a, b in sentence_spans(text)]


# ---------------------------------------------------------------- the judge

ATOMIC = """Below are a user's instruction and an AI assistant's whole response. One sentence of that response is
repeated in <sentence>. Rate only that sentence, read in the context of the whole response, on an integer
scale from {lo} to {hi}: is it correct (factually and logically), relevant to the instruction and useful?
{lo} means wrong, misleading or irrelevant; {hi} means correct, relevant and useful. Do not rate the other
sentences, and do not reward or punish the sentence for what it leaves to the rest of the response.
{reference_note}
{material}

{answer_format}"""

ANSWER_FORMAT = ("Give a one- or two-sentence justification. Then finish with one final line that contains only:\n"
                 "Score: <an integer from {lo} to {hi}>",
                 "Answer with one line only, no explanation:\nScore: <an integer from {lo} to {hi}>")

SENTENCE_TAG = "sentence"
_SENTENCE_TAG = re.compile(r"<(\s*/?\s*" + SENTENCE_TAG + r"\b)", re.IGNORECASE)
_SENTENCE_ECHO = re.compile(r"<\s*" + SENTENCE_TAG + r"\s*>(?:.*<\s*/\s*" + SENTENCE_TAG + r"\s*>|.*\Z)",
                            re.IGNORECASE | re.DOTALL)


def _block(tag: str, text: str) -> str:
    """`judge_prompts.block`, with the `<sentence>` tag neutralised as well as the standard ones."""
    return jp.block(tag, _SENTENCE_TAG.sub(r"&lt;\1", text))


def parse_sentence_score(text: str, lo: int, hi: int) -> jp.Parsed:
    """`judge_prompts.parse_score` on the judge's answer with any echoed `<sentence>` block removed first
    (a score quoted from the material is never read as the verdict)."""
    return jp.parse_score(_SENTENCE_ECHO.sub("", text), lo, hi)


class AtomicLLMJudge(_LLMJudge):
    """Sentence-level pointwise judge: one `Score: n` verdict (integer, `scale`, default 1..10) per sentence
    of the candidate, in context; `steps` = per-sentence scores, `scores` = their mean and min.

    All sentences of all items go to the backend in one batch (re-asks batch the unparsed ones); cost is one
    judge call per sentence. Options are those of the other LLM judges (`max_new_tokens`, `temperature`,
    `parse_retries`, `reference`, `brief`, ...), plus `allow_partial` (see the module docstring).
    """

    kind = "llm_atomic"
    logprob_verdicts = False  # one verdict per sentence is generated and parsed

    def __init__(self, backend: TextBackend, *, scale: tuple[int, int] = (1, 10), criterion: str = "sentence",
                 allow_partial: bool = False, **kw):
        super().__init__(backend, **kw)
        self.lo, self.hi = scale
        if self.lo >= self.hi:
            raise ValueError(f"bad scale {scale}")
        self.criterion = criterion
        self.allow_partial = allow_partial

    def _conversation(self, prompt: Prompt, candidate: Candidate, sentence: str,
                      reference: list[tuple[str, str]]) -> list[Message]:
        blocks = [("instruction", prompt.prompt), *reference, ("response", candidate.completion),
                  (SENTENCE_TAG, sentence)]
        material = "\n\n".join(_block(tag, text) for tag, text in blocks)
        note = jp.REFERENCE_NOTE if reference else ""
        answer_format = ANSWER_FORMAT[int(bool(getattr(self, "brief", False)))].format(lo=self.lo, hi=self.hi)
        user = ATOMIC.format(lo=self.lo, hi=self.hi, reference_note=note, material=material,
                             answer_format=answer_format)
        return [{"role": "system", "content": jp.SYSTEM}, {"role": "user", "content": user}]

    def _parse(self, text: str) -> jp.Parsed:
        return parse_sentence_score(text, self.lo, self.hi)

    def score(self, items: list[tuple[Prompt, Candidate]]) -> list[Judgment]:
        convs: list[list[Message] | str] = []
        plans: list[tuple[list[str], int, str]] = []  # (sentences, first conversation index, pre-failure)
        for prompt, cand in items:
            sentences = split_sentences(cand.completion)
            try:
                reference = self._reference_blocks(prompt)
            except ValueError as exc:
                plans.append((sentences, len(convs), str(exc)))
                continue
            plans.append((sentences, len(convs), ""))
            convs.extend(self._conversation(prompt, cand, s, reference) for s in sentences)
        outcomes = self._run(convs, self._parse) if convs else []
        out = []
        for (prompt, cand), (sentences, first, failure) in zip(items, plans, strict=True):
            j = Judgment(prompt_id=prompt.id, candidate_ids=[cand.id], judge=self.name)
            if failure:
                j.status, j.reason = "error", failure
            elif not sentences:
                j.status, j.reason, j.raw = "invalid", "no sentences in the response", json.dumps({"sentences": []})
            else:
                self._fill(j, sentences, outcomes[first : first + len(sentences)])
            out.append(j)
        return out

    def _fill(self, j: Judgment, sentences: list[str], group: list[_Outcome]) -> None:
        """Per-sentence values into `steps`, the aggregate into `scores`, the status by the module's rule."""
        values = [float(o.parsed.value) if o.status == "ok" and o.parsed else math.nan for o in group]  # type: ignore[arg-type]
        good = [v for v in values if not math.isnan(v)]
        j.steps = values
        j.raw = json.dumps({"sentences": [
            {"text": s, "status": o.status, "score": None if math.isnan(v) else v, "reason": o.reason,
             "attempts": o.attempts} for s, o, v in zip(sentences, group, values, strict=True)]})
        failed = [o for o in group if o.status != "ok"]
        if failed and not (self.allow_partial and good):
            j.status = "error" if any(o.status == "error" for o in failed) else "invalid"
            j.reason = f"{len(failed)} of {len(group)} sentences not scored; first: {failed[0].reason}"
            return
        j.scores = {f"{self.criterion}_mean": sum(good) / len(good), f"{self.criterion}_min": min(good)}
        j.rationale = "\n".join(f"[{n}] {o.parsed.rationale}" for n, o in enumerate(group, start=1)
                                if o.status == "ok" and o.parsed and o.parsed.rationale)
        if failed:
            j.reason = f"{len(good)}/{len(group)} sentences scored"
