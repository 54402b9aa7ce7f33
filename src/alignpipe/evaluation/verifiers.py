"""The model-free judges (math answer check, code execution, rules, imported human labels, provenance) under the one
batched pointwise contract of `base.PointwiseJudge`: `score(items) -> judgments`, in order.

Each verifier is written as a function of one `(Prompt, Candidate)`; `FunctionJudge` runs it over a batch
with a progress bar and turns a crash into that item's `error` judgment, so one odd row never aborts a round.
The code verifier runs its sandboxes two at a time (`verify_code_batch`).
"""

from __future__ import annotations

from collections.abc import Callable

from alignpipe.progress import progress
from alignpipe.records import Candidate, Judgment, Prompt

VerifierFn = Callable[[Prompt, Candidate], Judgment]


class FunctionJudge:
    """A per-item judging function as a batched pointwise judge."""

    def __init__(self, name: str, fn: VerifierFn) -> None:
        self.name, self.fn = name, fn

    def score(self, items: list[tuple[Prompt, Candidate]]) -> list[Judgment]:
        out = []
        with progress() as bar:
            task = bar.add_task(f"judging ({self.name})", total=len(items), info="")
            for prompt, candidate in items:
                try:
                    out.append(self.fn(prompt, candidate))
                except Exception as exc:  # noqa: BLE001 - a judge crash is a recorded error, not a lost row
                    out.append(Judgment(prompt_id=prompt.id, candidate_ids=[candidate.id], judge=self.name,
                                        status="error", reason=f"{type(exc).__name__}: {exc}"))
                bar.update(task, advance=1)
        return out


class CodeVerifierJudge:
    """HumanEval-style unit tests in the sandbox (`code_verifier`), `workers` programs at a time."""

    name = "code_verifier"

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers

    def score(self, items: list[tuple[Prompt, Candidate]]) -> list[Judgment]:
        from alignpipe.evaluation.code_verifier import verify_code_batch

        with progress() as bar:
            task = bar.add_task(f"judging ({self.name})", total=len(items), info="sandboxed")
            out = verify_code_batch([p for p, _ in items], [c for _, c in items], workers=self.workers)
            bar.update(task, completed=len(items))
        return out


def verifier(name: str) -> FunctionJudge | CodeVerifierJudge | None:
    """The model-free judge called `name`, or None when `name` is not one."""
    if name == "code_verifier":
        return CodeVerifierJudge()
    if name == "math_verifier":
        from alignpipe.evaluation.math_verifier import math_verifier

        return FunctionJudge(name, math_verifier)
    if name == "rule_verifier":
        from alignpipe.evaluation.rules import rule_verifier

        return FunctionJudge(name, rule_verifier)
    if name == "human_label":
        from alignpipe.evaluation.human_label import human_label

        return FunctionJudge(name, human_label)
    if name == "provenance":
        from alignpipe.evaluation.human_label import provenance

        return FunctionJudge(name, provenance)
    return None


VERIFIERS = ("math_verifier", "code_verifier", "rule_verifier", "human_label", "provenance")
# the verifiers that check an answer's correctness (and so can score held-out answers)
ANSWER_CHECKERS = ("math_verifier", "code_verifier", "rule_verifier")
