"""Held-out win rate of the final policy against the round-0 policy, judged by a held-out judge.

`before[i]` (round-0 policy) and `after[i]` (final policy) answer `prompts[i]`. Per prompt i the outcome
for `after` is o_i in [0, 1]:

- **pairwise** judge: both orders, (after, before) and (before, after), are asked in one batched
  `compare` call of 2n items. Each ok order gives v = 1 (after wins), 0.5 (tie) or 0 (after loses), and
  o_i = mean of v over the ok orders (an order disagreement is 0.5, one ok order counts alone). A prompt
  with no ok order is excluded. `both_order_consistency` = share of the prompts with both orders ok whose
  two v agree (a judge that always answers "first" scores 0 here and exactly 0.5 as win rate).
- **pointwise** judge: all 2n candidates are scored in one `score` call; s = `main_score` of the judgment
  (the only score, else `overall`, else the mean of `scores`); o_i = 1 if s_after > s_before, 0.5 if
  equal, 0 if lower. A prompt is excluded when either judgment has no usable score.

Over the n judged prompts:

    win_rate = mean_i o_i
    ci95     = win_rate -/+ 1.96 * sd(o) / sqrt(n)     (sd with ddof=1; normal interval of a mean,
                                                          clipped to [0, 1]; n = 1 gives [0, 1])
    lc_win_rate = mean_i sigmoid(theta_0)               (AlpacaEval length control, length_control.py:
                  logit P(after wins | i) = theta_len * tanh(delta_i / sd(delta)) + theta_0,
                  delta_i = len(after_i) - len(before_i) in characters; None when n < 2)

`ties` counts judged prompts with o_i = 0.5; `excluded` counts excluded prompts by status
("error" when every failed judgment of the prompt is an error, else "invalid").
"""

from __future__ import annotations

import math
from typing import Any

from alignpipe.evaluation.ensemble import is_pairwise, main_score, safe_call
from alignpipe.evaluation.length_control import length_controlled
from alignpipe.records import Candidate, Judgment, Prompt

_AFTER_FIRST = {"first": 1.0, "tie": 0.5, "second": 0.0}  # value for `after` when shown first
_AFTER_SECOND = {"first": 0.0, "tie": 0.5, "second": 1.0}


def _check(prompts: list[Prompt], before: list[Candidate], after: list[Candidate]) -> None:
    if not len(prompts) == len(before) == len(after):
        raise ValueError(f"heldout_winrate: {len(prompts)} prompts, {len(before)} before and "
                         f"{len(after)} after candidates")
    for i, (p, b, a) in enumerate(zip(prompts, before, after, strict=True)):
        if not p.id == b.prompt_id == a.prompt_id:
            raise ValueError(f"heldout_winrate: item {i} mixes prompt ids {p.id!r} (prompt), "
                             f"{b.prompt_id!r} (before), {a.prompt_id!r} (after)")


def _failed(judgments: list[Judgment]) -> str:
    return "error" if judgments and all(j.status == "error" for j in judgments) else "invalid"


def _pairwise(judge: Any, prompts: list[Prompt], before: list[Candidate], after: list[Candidate]
              ) -> tuple[list[float | None], list[str | None], float | None]:
    n = len(prompts)
    items = [(p, a, b) for p, b, a in zip(prompts, before, after, strict=True)]
    items += [(p, b, a) for p, b, a in zip(prompts, before, after, strict=True)]
    out = safe_call(judge, "compare", items)
    outcomes: list[float | None] = []
    reasons: list[str | None] = []
    both, agree = 0, 0
    for j1, j2 in zip(out[:n], out[n:], strict=True):
        v1 = _AFTER_FIRST.get(j1.preference or "") if j1.status == "ok" else None
        v2 = _AFTER_SECOND.get(j2.preference or "") if j2.status == "ok" else None
        vals = [v for v in (v1, v2) if v is not None]
        if v1 is not None and v2 is not None:
            both += 1
            agree += v1 == v2
        outcomes.append(sum(vals) / len(vals) if vals else None)
        reasons.append(None if vals else _failed([j1, j2]))
    return outcomes, reasons, (agree / both if both else None)


def _pointwise(judge: Any, prompts: list[Prompt], before: list[Candidate], after: list[Candidate]
               ) -> tuple[list[float | None], list[str | None], float | None]:
    n = len(prompts)
    items = [(p, a) for p, a in zip(prompts, after, strict=True)]
    items += [(p, b) for p, b in zip(prompts, before, strict=True)]
    out = safe_call(judge, "score", items)
    outcomes: list[float | None] = []
    reasons: list[str | None] = []
    for ja, jb in zip(out[:n], out[n:], strict=True):
        sa, sb = main_score(ja), main_score(jb)
        if sa is None or sb is None:
            outcomes.append(None)
            reasons.append(_failed([j for j, s in ((ja, sa), (jb, sb)) if s is None]))
        else:
            outcomes.append(1.0 if sa > sb else 0.0 if sa < sb else 0.5)
            reasons.append(None)
    return outcomes, reasons, None


def mean_ci95(values: list[float]) -> tuple[float | None, float | None, float | None]:
    """Mean with a normal 95% interval (sd with ddof=1), clipped to [0, 1]; n = 1 gives [0, 1]."""
    n = len(values)
    if n == 0:
        return None, None, None
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0, 1.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = 1.96 * sd / math.sqrt(n)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def heldout_winrate(judge: Any, prompts: list[Prompt], before: list[Candidate],
                    after: list[Candidate]) -> dict[str, Any]:
    """Win rate of `after` over `before` on the same prompts (see the module docstring).

    Raises ValueError when the three lists differ in length or `prompts[i].id`, `before[i].prompt_id`
    and `after[i].prompt_id` differ. A judge call that raises becomes one error judgment per item."""
    _check(prompts, before, after)
    pairwise = is_pairwise(judge)
    if not prompts:
        outcomes, reasons, consistency = [], [], None
    elif pairwise:
        outcomes, reasons, consistency = _pairwise(judge, prompts, before, after)
    else:
        outcomes, reasons, consistency = _pointwise(judge, prompts, before, after)
    judged = [i for i, o in enumerate(outcomes) if o is not None]
    values = [outcomes[i] for i in judged]
    win, low, high = mean_ci95(values)
    excluded: dict[str, int] = {}
    for r in reasons:
        if r is not None:
            excluded[r] = excluded.get(r, 0) + 1
    lc, theta_len = None, None
    if len(values) >= 2:
        fit = length_controlled(values, [len(after[i].completion) for i in judged],
                                [len(before[i].completion) for i in judged])
        if math.isfinite(fit["lc"]):
            lc, theta_len = fit["lc"], fit["theta_len"]
    return {
        "win_rate": win, "ci95_low": low, "ci95_high": high, "lc_win_rate": lc, "theta_len": theta_len,
        "n": len(values), "excluded": excluded, "ties": sum(v == 0.5 for v in values),
        "both_order_consistency": consistency, "judge": judge.name,
        "kind": "pairwise" if pairwise else "pointwise", "outcomes": outcomes,
    }
