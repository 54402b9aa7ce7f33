"""Stage 2: evaluation. Judges turn candidates into `Judgment` records.

A pointwise judge is a function `(Prompt, Candidate) -> Judgment`; the registry maps recipe names to them.
"""

from __future__ import annotations

from collections.abc import Callable

from alignpipe.evaluation.code_verifier import code_verifier
from alignpipe.evaluation.human_label import human_label
from alignpipe.evaluation.math_verifier import math_verifier
from alignpipe.evaluation.rules import rule_verifier
from alignpipe.progress import progress
from alignpipe.records import Candidate, Judgment, Prompt

PointwiseJudge = Callable[[Prompt, Candidate], Judgment]
JUDGES: dict[str, PointwiseJudge] = {
    "math_verifier": math_verifier,
    "code_verifier": code_verifier,
    "rule_verifier": rule_verifier,
    "human_label": human_label,
}


def judge_candidates(judge: str, prompts: list[Prompt], candidates: list[Candidate]) -> list[Judgment]:
    """One judgment per candidate, in candidate order; failures are recorded, never dropped."""
    by_id = {p.id: p for p in prompts}
    fn = JUDGES[judge]
    out = []
    with progress() as bar:
        task = bar.add_task(f"judging ({judge})", total=len(candidates), info="")
        for c in candidates:
            try:
                out.append(fn(by_id[c.prompt_id], c))
            except Exception as exc:  # noqa: BLE001 - a judge crash is a recorded error, not a lost row
                out.append(Judgment(prompt_id=c.prompt_id, candidate_ids=[c.id], judge=judge, status="error",
                                    reason=f"{type(exc).__name__}: {exc}"))
            bar.update(task, advance=1)
    return out
