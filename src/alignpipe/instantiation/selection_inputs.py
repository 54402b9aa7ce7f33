"""Inputs of the selection rules (`instantiation.selection`), computed from a round's data and models.

- `pair_logps`: per pair, summed completion log-probs under the policy and the reference (for the implicit
  reward margin), through the trainer's own log-prob code;
- `judge_disagreement`, `ensemble_margin_variance`, `policy_entropy`: per example uncertainty values for
  `uncertainty_select`. Examples carry completion texts, not candidate ids: their candidates (and through
  them their judgments) are found by (prompt id, completion text).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from itertools import combinations
from typing import Any

import numpy as np

from alignpipe import AlignpipeError
from alignpipe.records import GroupExample, Judgment, PairExample

_OUTCOME = {"first": 1.0, "second": 0.0, "tie": 0.5}  # a pairwise verdict, for the candidate shown first


@dataclass
class PairLogps:
    """Per pair, summed completion log-probs under the policy and under the reference."""

    chosen: Sequence[float]
    rejected: Sequence[float]
    ref_chosen: Sequence[float]
    ref_rejected: Sequence[float]

    def margins(self, beta: float) -> np.ndarray:
        """beta * [(pi_w - ref_w) - (pi_l - ref_l)]: the DPO implicit reward gap per pair."""
        arr = [np.asarray(v, dtype=np.float64) for v in (self.chosen, self.rejected, self.ref_chosen,
                                                           self.ref_rejected)]
        if len({a.shape for a in arr}) != 1:
            raise AlignpipeError(f"implicit_margin: log-prob arrays differ in length: {[len(a) for a in arr]}")
        return beta * ((arr[0] - arr[2]) - (arr[1] - arr[3]))


def pair_logps(model: Any, tokenizer: Any, examples: list[PairExample], cfg: Any = None,
               reference_model: Any = None) -> PairLogps:
    """Summed completion log-probs of each pair's chosen and rejected under the policy and its reference,
    tokenised and batched exactly as training does (`optimization.instances`), through the trainer's own
    `completion_logps` / `reference_logps`: with LoRA the reference is the policy with adapters disabled,
    under full fine-tuning `reference_model` (the frozen copy). `cfg`: an OptimizationConfig (default one
    if None; max_length, batch size, precision and `reference` are read from it); temperature is 1, as for
    the DPO implicit reward."""
    # imported here: instantiation comes before optimization in the pipeline and must not need it to load
    from alignpipe.config import OptimizationConfig
    from alignpipe.optimization.instances import Instances
    from alignpipe.optimization.scoring import completion_logps, reference_logps

    cfg = (cfg or OptimizationConfig()).model_copy(update={"temperature": 1.0})
    if not examples:
        return PairLogps([], [], [], [])
    rows = Instances(examples, tokenizer, cfg.max_length).flat_rows()  # [chosen, rejected] per pair
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    policy = [float(t.sum()) for t in completion_logps(model, rows, pad_id, cfg, "policy log-probs")]
    ref = [float(t.sum()) for t in reference_logps(model, rows, pad_id, cfg, "reference log-probs",
                                                   reference_model)]
    return PairLogps(policy[0::2], policy[1::2], ref[0::2], ref[1::2])


def candidate_ids_by_text(candidates: list) -> dict[tuple[str, str], list[str]]:
    """(prompt id, completion text) -> the ids of the candidates with that text: examples carry texts, not
    candidate ids, so their judgments are found through this."""
    out: dict[tuple[str, str], list[str]] = {}
    for c in candidates:
        out.setdefault((c.prompt_id, c.completion), []).append(c.id)
    return out


def _members(judgment: Any) -> list[Any]:
    """An ensemble judgment's member judgments (from its `raw` JSON), else the judgment itself."""
    try:
        raw = json.loads(judgment.raw) if judgment.raw else None
    except (TypeError, ValueError):
        raw = None
    if isinstance(raw, dict) and isinstance(raw.get("members"), list):
        names = {f.name for f in fields(Judgment)}
        return [Judgment(**{k: v for k, v in m.items() if k in names}) for m in raw["members"] if isinstance(m, dict)]
    return [judgment]


def _outcomes(prompt_id: str, first: list[str], second: list[str], judgments: list) -> list[float]:
    """Every ok pairwise verdict between a candidate of `first` and one of `second`, in either order and over
    ensemble members, as the outcome for `first`: 1 preferred, 0.5 tie, 0 not."""
    a_ids, b_ids = set(first), set(second)
    out = []
    for j in judgments:
        if j.prompt_id != prompt_id or len(j.candidate_ids) != 2:
            continue
        x, y = j.candidate_ids
        if x in a_ids and y in b_ids:
            flip = False
        elif x in b_ids and y in a_ids:
            flip = True
        else:
            continue
        for m in _members(j):
            if m.status != "ok" or m.preference not in _OUTCOME:
                continue
            s = _OUTCOME[m.preference]
            out.append(1.0 - s if flip else s)
    return out



def judge_disagreement(examples: list[PairExample], candidates: list, judgments: list) -> list[float]:
    """Per pair, how much the pairwise verdicts on (chosen, rejected) disagree: over both presentation orders
    and ensemble members (vote ensembles keep theirs in `raw`), the mean absolute difference of the outcomes
    over all pairs of verdicts (outcome for chosen: 1 / 0.5 tie / 0), in [0, 1]: 0 when every verdict agrees,
    1 for one verdict each way (position bias). NaN with fewer than two ok verdicts."""
    ids = candidate_ids_by_text(candidates)
    out = []
    for e in examples:
        s = _outcomes(e.prompt_id, ids.get((e.prompt_id, e.chosen), []), ids.get((e.prompt_id, e.rejected), []),
                      judgments)
        n = len(s)
        out.append(sum(abs(a - b) for a, b in combinations(s, 2)) / (n * (n - 1) / 2) if n >= 2 else math.nan)
    return out


def _member_scores(judgment: Any, dim: str | None) -> list[float | None]:
    """Per ensemble member, its scalar score (criterion `dim`, else the mean of its criteria); None if not ok."""
    scores = []
    for m in _members(judgment):
        vals = m.scores if dim is None else {dim: m.scores[dim]} if dim in m.scores else {}
        scores.append(float(np.mean(list(vals.values()))) if m.status == "ok" and vals else None)
    return scores


def ensemble_margin_variance(examples: list[PairExample], candidates: list, judgments: list,
                             dim: str | None = None) -> list[float]:
    """Per pair, U = Var_k(m_k), m_k = r_k(yw) - r_k(yl) over the members k of a pointwise ensemble judge
    (population variance; methods.md 5.1), members taken from each candidate's judgment `raw`. Members
    without an ok score for both count for neither; NaN when fewer than two remain."""
    ids = candidate_ids_by_text(candidates)
    by_cand = {j.candidate_ids[0]: j for j in judgments if len(j.candidate_ids) == 1}
    out = []
    for e in examples:
        jw = next((by_cand[i] for i in ids.get((e.prompt_id, e.chosen), []) if i in by_cand), None)
        jl = next((by_cand[i] for i in ids.get((e.prompt_id, e.rejected), []) if i in by_cand), None)
        if jw is None or jl is None:
            out.append(math.nan)
            continue
        sw, sl = _member_scores(jw, dim), _member_scores(jl, dim)
        margins = [w - lo for w, lo in zip(sw, sl, strict=False) if w is not None and lo is not None]
        out.append(float(np.var(margins)) if len(margins) >= 2 else math.nan)
    return out


def policy_entropy(examples: list, candidates: list, entropy: dict[str, float]) -> list[float]:
    """Per example, the mean of its completions' policy entropies (`entropy`: candidate id -> mean token
    entropy of the policy over that completion): chosen and rejected of a pair, every completion of a group,
    the completion of a point. NaN when none of them has a value."""
    ids = candidate_ids_by_text(candidates)
    out = []
    for e in examples:
        texts = ([e.chosen, e.rejected] if isinstance(e, PairExample)
                 else list(e.completions) if isinstance(e, GroupExample) else [e.completion])
        vals = []
        for t in texts:
            vals += [entropy[i] for i in ids.get((e.prompt_id, t), [])[:1] if i in entropy]
        out.append(float(np.mean(vals)) if vals else math.nan)
    return out
