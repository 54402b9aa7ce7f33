"""Stage 2: evaluation. Judges turn candidates into `Judgment` records.

One contract (`base.py`): a pointwise judge scores a batch of `(Prompt, Candidate)`, a pairwise judge
compares a batch of `(Prompt, Candidate, Candidate)`; one registry (`judge_registry.py`) builds either from a
spec string, for `alignpipe run` and `alignpipe judge-eval` alike. `judge_candidates` is what the loop calls.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from alignpipe.records import Candidate, Judgment, Prompt


def is_pairwise(judge: Any) -> bool:
    return callable(getattr(judge, "compare", None))


def judge_candidates(judge: Any, prompts: list[Prompt], candidates: list[Candidate], *,
                     max_comparisons: int | None = None, aggregate: str = "win_rate", both_orders: bool = True,
                     seed: int = 0) -> list[Judgment]:
    """One per-candidate judgment per candidate, in candidate order; failures are recorded, never dropped.

    `judge` is a judge object or a spec string (built by a fresh registry). A pairwise judge compares each
    prompt's candidates by `pairwise_groups.comparison_plan` and scores them by `aggregate` (win rate or
    Bradley-Terry); its raw verdicts follow the per-candidate judgments in the returned list (they carry two
    candidate ids, so instantiation reads only the per-candidate ones)."""
    from alignpipe.evaluation.ensemble import safe_call

    if isinstance(judge, str):
        from alignpipe.evaluation.judge_registry import resolve_judge

        judge = resolve_judge(judge)
    by_id = {p.id: p for p in prompts}
    if not is_pairwise(judge):
        return safe_call(judge, "score", [(by_id[c.prompt_id], c) for c in candidates])
    from alignpipe.evaluation.pairwise_groups import judge_groups

    grouped: dict[str, list[Candidate]] = defaultdict(list)
    for c in candidates:
        grouped[c.prompt_id].append(c)
    groups = [(by_id[pid], group) for pid, group in grouped.items()]
    per_candidate, raw = judge_groups(judge, groups, max_comparisons=max_comparisons, aggregate=aggregate,
                                      both_orders=both_orders, seed=seed)
    by_candidate = {j.candidate_ids[0]: j for j in per_candidate}
    return [by_candidate[c.id] for c in candidates] + raw
