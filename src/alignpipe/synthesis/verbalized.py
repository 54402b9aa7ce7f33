"""Verbalized sampling (arXiv 2510.01171): ask for n distinct answers in one response, parse them into n
candidates. Asking the model to verbalize a distribution of answers, instead of sampling one answer n
times, counters the mode collapse of aligned models (the n samples of one answer tend to be alike).

Format: a numbered list, one answer per item ("1. ...", "2. ...", markers at the start of a line). The
paper's own format (<response><text>..</text><probability>..</probability></response> blocks) is beyond a
135M instruction model; numbered lists are what small chat models write most readily, so SmolLM2-135M
follows this at least some of the time, and the parser takes whatever part of it came out right:

- items start at a line-start marker `N.` / `N)` / `N:` (optionally bulleted or bold, as in "**2.**") whose
  number is the next expected one (1, 2, ...); other numbers inside an item are its text; text before "1."
  is ignored (a preamble such as "Here are 3 answers:");
- an item runs to the next expected marker; a marker past n ends the list (`extra`); the last item ends at
  the first blank line (what follows is commentary such as "I hope this helps.") or at the end of the text;
- an item with no letter or digit (empty, "...") is dropped (`empty`);
- with `truncated=True` (generation hit its token limit) a last item that runs to the end of the text was
  cut off and is dropped (`cut_off`);
- status: `ok` (n answers), `partial` (some), `invalid` (none: garbage).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from alignpipe import AlignpipeError
from alignpipe.records import Candidate, Prompt

_MARKER = re.compile(r"^[ \t]*(?:[-*>#]+[ \t]*)?\**(\d{1,3})\**[.):]\**(?=\s|$)[ \t]*", re.MULTILINE)
_CONTENT = re.compile(r"[^\W_]")  # a letter or a digit in any script
_BLANK = re.compile(r"\n[ \t]*\n")


def verbalized_prompt(prompt_text: str, n: int) -> str:
    """The user's request followed by the instruction to answer it n different ways as a numbered list.

    Worded so that SmolLM2-135M-Instruct keeps the format: greedy, it wrote a parseable numbered list for 6 of
    6 short prompts (arithmetic, names, greetings) with this wording; a variant showing a template
    ("1. <answer 1>") was echoed literally for 2 of 6, a looser one ("List n different possible answers")
    added commentary after the list. The answers themselves often repeat: the parser does not dedupe."""
    if n < 1:
        raise AlignpipeError(f"verbalized sampling needs n >= 1 answers per response, got {n}")
    return (f"{prompt_text.rstrip()}\n\nGive {n} different answers to this, as a numbered list (1. to {n}.), "
            f"one answer per line, and nothing else.")


def parse_verbalized(text: str, n: int, truncated: bool = False) -> tuple[list[str], dict[str, Any]]:
    """Up to n answers from one verbalized response (see the module docstring) and the parse's counts:
    expected, parsed, empty, extra, cut_off, status."""
    if n < 1:
        raise AlignpipeError(f"verbalized sampling needs n >= 1 answers per response, got {n}")
    spans: list[tuple[int, int]] = []  # (start of the item's text, start of the next marker or end)
    expected, extra, end = 1, 0, len(text)
    for m in _MARKER.finditer(text):
        if int(m.group(1)) != expected:
            continue
        if expected > n:
            extra, end = 1, m.start()
            break
        if spans:
            spans[-1] = (spans[-1][0], m.start())
        spans.append((m.end(), len(text)))
        expected += 1
    cut_off = 0
    if spans:
        start, stop = spans[-1][0], min(spans[-1][1], end)
        # the first blank line after some of the item's text (blank lines before it don't end it)
        blank = next((b for b in _BLANK.finditer(text, start, stop) if text[start : b.start()].strip()), None)
        if blank:
            stop = blank.start()
        elif truncated and not extra:  # the last item ran into the token limit
            stop = start
            cut_off = 1
        spans[-1] = (start, stop)
    answers, empty = [], 0
    for start, stop in spans:
        item = text[start:stop].strip()
        if _CONTENT.search(item):
            answers.append(item)
        elif stop > start:  # a cut-off item is counted as cut off only
            empty += 1
    status = "ok" if len(answers) == n else "partial" if answers else "invalid"
    return answers, {"expected": n, "parsed": len(answers), "empty": empty, "extra": extra, "cut_off": cut_off,
                     "status": status}


def verbalized_candidates(prompts: list[Prompt], responses: list[str | Candidate], n: int,
                          source: dict[str, Any] | None = None) -> tuple[list[Candidate], dict[str, Any]]:
    """Split each prompt's verbalized response (`responses[i]` answers `prompts[i]`: a text, or the generated
    Candidate, whose `source` and `truncated` carry over) into up to n candidates with ids
    f"{prompt_id}/v{j}" (j counts on over a prompt's responses when it has several) and
    source {..., "verbalized": True, "verbalized_index": j}.

    Stats: responses, expected (n per response), parsed, ok / partial / invalid (responses by status),
    empty, extra, cut_off (items), invalid_rate (share of responses with no answer), parse_rate
    (parsed / expected)."""
    if len(prompts) != len(responses):
        raise AlignpipeError(f"verbalized sampling: {len(responses)} responses for {len(prompts)} prompts")
    out: list[Candidate] = []
    totals: dict[str, Any] = defaultdict(int)
    next_j: dict[str, int] = defaultdict(int)
    for prompt, response in zip(prompts, responses, strict=True):
        is_cand = isinstance(response, Candidate)
        text = response.completion if is_cand else response
        answers, st = parse_verbalized(text, n, truncated=response.truncated if is_cand else False)
        base = dict(response.source) if is_cand else {}
        base.update(source or {}, verbalized=True)
        if is_cand:
            base["response_id"] = response.id
        for answer in answers:
            j = next_j[prompt.id]
            next_j[prompt.id] += 1
            out.append(Candidate(prompt_id=prompt.id, id=f"{prompt.id}/v{j}", completion=answer,
                                 source=dict(base, verbalized_index=j)))
        for k in ("expected", "parsed", "empty", "extra", "cut_off"):
            totals[k] += st[k]
        totals[st["status"]] += 1
    stats = {"responses": len(responses), **{k: totals[k] for k in ("expected", "parsed", "ok", "partial",
                                                                      "invalid", "empty", "extra", "cut_off")}}
    stats["invalid_rate"] = stats["invalid"] / len(responses) if responses else 0.0
    stats["parse_rate"] = stats["parsed"] / stats["expected"] if stats["expected"] else 0.0
    return out, stats
