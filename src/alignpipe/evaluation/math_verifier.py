"""A math verifier: extract the final answer of a completion and compare it with the gold answer.

Plain numbers compare exactly (`math_numbers`: no floats, scientific notation and thousands separators read
as one number, `1,2` matches no single number); anything else goes to math-verify with a real time limit
that holds on every thread (`symbolic_math`). A comparison that cannot be decided (timed out, refused as a
power tower, unreadable reference) is a judgment with status `error`, never a guessed 0 or 1.
"""

from __future__ import annotations

import re

from alignpipe.evaluation.math_numbers import AMBIGUOUS, NUMBER, normalize_token, parse_exact
from alignpipe.evaluation.symbolic_math import DEADLINE_S, VerificationError, symbolic_match
from alignpipe.records import Candidate, Judgment, Prompt

__all__ = ["VerificationError", "answers_match", "extract_answer", "math_verifier"]


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
    then the last number in the text. None when there is no answer at all.

    A number is one token with its scientific notation (`1.5e3`, `1.5 \\times 10^{3}`) or power (`2^{10}`);
    valid thousands separators are dropped (`1,234` -> `1234`), ambiguous ones kept (`1,2` stays `1,2`)."""
    if "####" in text:
        m = re.search(NUMBER, text.split("####")[-1])
        if m:
            return normalize_token(m.group(0))
    boxed = _boxed(text)
    if boxed:
        return boxed
    m = re.findall(r"answer is[:\s]*\$?\\?\(?\s*(" + NUMBER + ")", text, flags=re.IGNORECASE)
    if m:
        return normalize_token(m[-1])
    numbers = re.findall(NUMBER, text)
    if numbers:
        return normalize_token(numbers[-1])
    return None


def answers_match(predicted: str, gold: str, deadline_s: float = DEADLINE_S) -> bool:
    """Whether `predicted` equals `gold`: exactly when both are plain numbers (an ambiguous `1,2` equals no
    single number), else by math-verify within `deadline_s` seconds. The same verdict on any thread.

    Raises VerificationError when it cannot decide (timed out, refused, reference unreadable)."""
    exact_pred, exact_gold = parse_exact(predicted), parse_exact(gold)
    numbers = [v for v in (exact_pred, exact_gold) if v is not None and v is not AMBIGUOUS]
    if len(numbers) == 2:
        return exact_pred == exact_gold
    if numbers and AMBIGUOUS in (exact_pred, exact_gold):
        return False
    return symbolic_match(predicted.strip(), gold.strip(), deadline_s)


def math_verifier(prompt: Prompt, candidate: Candidate) -> Judgment:
    """Score 1.0 if the candidate's final answer equals the prompt's reference, else 0.0.

    A completion with no answer at all scores 0.0 with status `ok` and reason "no final answer found": that
    is the verifier's verdict that it failed the task (training may reject it), not a failure of the
    judge. A prompt without a reference is an `error`: nothing is known about the candidate; so is a
    comparison that could not be decided (reason "verification timed out", "verification refused: power
    tower", ...).
    """
    base = dict(prompt_id=prompt.id, candidate_ids=[candidate.id], judge="math_verifier")
    if prompt.reference is None:
        return Judgment(**base, status="error", reason="prompt has no reference answer")
    predicted = extract_answer(candidate.completion)
    if predicted is None:
        return Judgment(**base, scores={"correct": 0.0}, reason="no final answer found")
    try:
        correct = answers_match(predicted, prompt.reference)
    except VerificationError as exc:
        return Judgment(**base, status="error", reason=exc.reason, raw=predicted,
                        rationale=f"extracted {predicted!r}, reference {prompt.reference!r}")
    return Judgment(**base, scores={"correct": float(correct)}, raw=predicted,
                    rationale=f"extracted {predicted!r}, reference {prompt.reference!r}")
