"""A math verifier: extract the final answer of a completion and compare it with the gold answer."""

from __future__ import annotations

import re

from alignpipe.records import Candidate, Judgment, Prompt

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?"


def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, by precedence: GSM8K `#### n`, `\\boxed{}`, "the answer is ...",
    then the last number in the text. None when there is no answer at all."""
    if "####" in text:
        m = re.search(_NUMBER, text.split("####")[-1])
        if m:
            return m.group(0).replace(",", "")
    boxed = _boxed(text)
    if boxed:
        return boxed
    m = re.findall(r"answer is[:\s]*\$?\\?\(?\s*(" + _NUMBER + ")", text, flags=re.IGNORECASE)
    if m:
        return m[-1].replace(",", "")
    numbers = re.findall(_NUMBER, text)
    if numbers:
        return numbers[-1].replace(",", "").rstrip(".")
    return None


def answers_match(predicted: str, gold: str) -> bool:
    """Exact numeric comparison first (fast, unambiguous); math-verify for LaTeX and symbolic forms."""
    try:
        return float(predicted.replace(",", "")) == float(gold.replace(",", ""))
    except ValueError:
        pass
    from math_verify import parse, verify

    try:
        gold_parsed = parse(gold if "$" in gold or "\\" in gold else f"${gold}$")
        pred_parsed = parse(predicted if "$" in predicted or "\\" in predicted else f"${predicted}$")
        return bool(gold_parsed) and bool(pred_parsed) and bool(verify(gold_parsed, pred_parsed))
    except Exception:  # noqa: BLE001 - math-verify raises on malformed LaTeX: not a match
        return False


def math_verifier(prompt: Prompt, candidate: Candidate) -> Judgment:
    """Score 1.0 if the candidate's final answer equals the prompt's reference, else 0.0.

    A completion with no answer at all scores 0.0 with status `ok` and reason "no final answer found": that
    is the verifier's verdict that it failed the task (training may reject it), not a failure of the
    judge. A prompt without a reference is an `error`: nothing is known about the candidate.
    """
    base = dict(prompt_id=prompt.id, candidate_ids=[candidate.id], judge="math_verifier")
    if prompt.reference is None:
        return Judgment(**base, status="error", reason="prompt has no reference answer")
    predicted = extract_answer(candidate.completion)
    if predicted is None:
        return Judgment(**base, scores={"correct": 0.0}, reason="no final answer found")
    correct = answers_match(predicted, prompt.reference)
    return Judgment(**base, scores={"correct": float(correct)}, raw=predicted,
                    rationale=f"extracted {predicted!r}, reference {prompt.reference!r}")
