"""Selection: which of a round's built examples are trained on (survey section 4.2).

Every rule takes the round's examples and a per-round `budget` (keep at most N examples, or the examples of
at most N prompts with `unit="prompt"`; None = no budget) and returns `(kept, stats)`; kept examples keep
their original order. `stats`: `rule`, `considered`, `kept`, `mean_margin` (the mean explicit score margin
of the kept examples: PairExample.margin, a group's max - min score; None for points or nothing kept),
`mean_key` (the mean of the quantity the rule ranked by over the kept ones) and `dropped` (counts by reason:
`below_threshold`, `over_budget`, `no_value`).

Rules (`SELECTION_RULES`, called through `select(rule, examples, budget, **params)`):

- `random(examples, budget, *, seed=0, unit="example")`: a seeded uniform subset (the baseline).
- `score_margin(examples, budget, *, min_margin=None, eta=None, tau=1.0, unit="example")`: the judge's score
  gap. RS-DPO's threshold (arXiv 2402.10038): keep a pair when sigmoid(margin / tau) > eta, i.e.
  margin > tau * logit(eta); or margin >= `min_margin`; then the largest margins within the budget.
- `implicit_margin(examples, budget, *, logps, beta=0.1, keep="highest", unit="example")`: the DPO implicit
  reward gap m = beta * [(log pi(yw|x) - log ref(yw|x)) - (log pi(yl|x) - log ref(yl|x))] (methods.md 5.3),
  pairs only. `logps` is a `PairLogps` (`pair_logps` computes one from a model; both in
  `selection_inputs`) or a callable `examples -> PairLogps`. `keep="highest"` (default): BeeS's margin
  maximisation (arXiv 2502.14560; low-margin pairs are noisy and shrink the parameters); `"lowest"`: the pairs the policy has most to learn
  from (it does not yet prefer yw); `"potential"`: alignment potential M_AP = z(m_ex) - z(m_im) (Huang et al.,
  ICML 2025: a large judged gap the policy has not learnt yet), highest first.
- `uncertainty(examples, budget, *, values, keep=None, measure=None, unit="example")`: rank by a given
  uncertainty per example (a sequence aligned with the examples, or a callable example -> float); the
  helpers `judge_disagreement`, `ensemble_margin_variance` and `policy_entropy` compute them from a round's
  judgments / token entropies. `keep="least"` keeps the most certain, `"most"` the least; the default
  follows `measure` as methods.md does: ensemble variance and judge disagreement keep the least uncertain
  (5.1: keep pairs whose members agree and whose variance is low; UPO drops pairs its estimator disputes),
  policy entropy keeps the most uncertain (5.2: APL keeps the highest-entropy prompts).

Prompt-level dynamic sampling (DAPO, arXiv 2503.14476): `tied_prompts` and `dynamic_fill`, independent of
the loop (which passes a callable that samples and judges fresh prompts).

Note for the implicit margin: with reference = the adapter-disabled base, a freshly initialised LoRA adapter
(B = 0) makes the policy equal the reference, so every implicit margin of round 0 is exactly 0; with
reference = round_start it is 0 in every round. The rule then ranks ties (kept in original order): it is
informative from round 1 on, against the base.
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from alignpipe import AlignpipeError
from alignpipe.instantiation.selection_inputs import (  # noqa: F401 - re-exported for the loop
    PairLogps,
    ensemble_margin_variance,
    judge_disagreement,
    pair_logps,
    policy_entropy,
)
from alignpipe.records import GroupExample, PairExample

UNITS = ("example", "prompt")


def margin_of(example: Any) -> float | None:
    """The explicit score margin of an example: a pair's `margin`, a group's score range; None for a point."""
    if isinstance(example, PairExample):
        return float(example.margin)
    if isinstance(example, GroupExample):
        return float(max(example.scores) - min(example.scores)) if example.scores else 0.0
    return None


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _stats(rule: str, examples: list, kept_idx: list[int], keys: Sequence[float] | None,
           dropped: dict[str, int]) -> dict[str, Any]:
    margins = [m for m in (margin_of(examples[i]) for i in kept_idx) if m is not None]
    return {
        "rule": rule,
        "considered": len(examples),
        "kept": len(kept_idx),
        "mean_margin": _mean(margins),
        "mean_key": _mean([float(keys[i]) for i in kept_idx]) if keys is not None else None,
        "dropped": {k: v for k, v in dropped.items() if v},
    }


def _check_budget(budget: int | None, unit: str) -> None:
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
        raise AlignpipeError(f"selection budget must be a whole number >= 0 or null, got {budget!r}")
    if unit not in UNITS:
        raise AlignpipeError(f"selection unit must be one of {', '.join(UNITS)}, got {unit!r}")


def top_within_budget(examples: list, candidates: list[int], keys: Sequence[float], budget: int | None,
                      unit: str = "example") -> list[int]:
    """Indices (from `candidates`, which are in original order) of the highest keys within the budget, in
    original order. Equal keys keep their original order (a stable sort: deterministic, no RNG). With
    `unit="prompt"` prompts are ranked by their best example's key and all their candidates are kept."""
    _check_budget(budget, unit)
    if budget is None:
        return list(candidates)
    if unit == "example":
        ranked = sorted(candidates, key=lambda i: -keys[i])  # sorted() is stable: ties stay in order
        return sorted(ranked[:budget])
    best: dict[str, float] = {}
    for i in candidates:  # dicts keep insertion order: prompts in order of first appearance
        pid = examples[i].prompt_id
        best[pid] = max(best.get(pid, -math.inf), keys[i])
    chosen = set(sorted(best, key=lambda p: -best[p])[:budget])
    return [i for i in candidates if examples[i].prompt_id in chosen]


def _finish(rule: str, examples: list, passed: list[int], keys: Sequence[float] | None,
            budget: int | None, unit: str, below: int = 0) -> tuple[list, dict[str, Any]]:
    kept_idx = top_within_budget(examples, passed, keys if keys is not None else [0.0] * len(examples),
                                 budget, unit)
    dropped = {"below_threshold": below, "over_budget": len(passed) - len(kept_idx)}
    return [examples[i] for i in kept_idx], _stats(rule, examples, kept_idx, keys, dropped)


# ---------------------------------------------------------------- rules


def random_select(examples: list, budget: int | None, *, seed: int = 0,
                  unit: str = "example") -> tuple[list, dict[str, Any]]:
    """A uniform random subset of `budget` examples (or of the examples of `budget` prompts), seeded."""
    rng = random.Random(seed)
    if unit == "prompt":
        prompt_key = {pid: rng.random() for pid in dict.fromkeys(e.prompt_id for e in examples)}
        keys = [prompt_key[e.prompt_id] for e in examples]
    else:
        keys = [rng.random() for _ in examples]
    kept, stats = _finish("random", examples, list(range(len(examples))), keys, budget, unit)
    stats["mean_key"] = None  # a random draw is no quantity worth averaging
    return kept, stats


def rs_dpo_threshold(eta: float, tau: float = 1.0) -> float:
    """The score gap above which RS-DPO keeps a pair: sigmoid(gap / tau) > eta <=> gap > tau * logit(eta)."""
    if not 0.0 < eta < 1.0 or tau <= 0:
        raise AlignpipeError(f"score_margin: eta must be in (0, 1) and tau > 0, got eta={eta}, tau={tau}")
    return tau * math.log(eta / (1.0 - eta))


def score_margin_select(examples: list, budget: int | None, *, min_margin: float | None = None,
                        eta: float | None = None, tau: float = 1.0,
                        unit: str = "example") -> tuple[list, dict[str, Any]]:
    """Keep the examples whose explicit score margin passes the threshold, then the largest within the budget.

    Threshold: `min_margin` (margin >= min_margin) and/or RS-DPO's `eta`/`tau` (margin > tau * logit(eta));
    neither: every example passes and only the budget selects."""
    keys = []
    for i, e in enumerate(examples):
        m = margin_of(e)
        if m is None:
            raise AlignpipeError(f"score_margin: example {i} is a {type(e).__name__}, which has no score margin")
        keys.append(m)
    threshold = rs_dpo_threshold(eta, tau) if eta is not None else None
    passed = [i for i, m in enumerate(keys)
              if (min_margin is None or m >= min_margin) and (threshold is None or m > threshold)]
    return _finish("score_margin", examples, passed, keys, budget, unit, below=len(examples) - len(passed))


def implicit_margins(examples: list, logps: PairLogps | Callable[[list], PairLogps], beta: float) -> np.ndarray:
    for i, e in enumerate(examples):
        if not isinstance(e, PairExample):
            raise AlignpipeError(f"implicit_margin: example {i} is a {type(e).__name__}; the rule needs pairs")
    lp = logps(examples) if callable(logps) else logps
    margins = lp.margins(beta)
    if len(margins) != len(examples):
        raise AlignpipeError(f"implicit_margin: {len(margins)} log-prob rows for {len(examples)} pairs")
    return margins


def _z(values: np.ndarray) -> np.ndarray:
    sd = values.std()
    return (values - values.mean()) / sd if sd > 0 else values - values.mean()


def implicit_margin_select(examples: list, budget: int | None, *,
                           logps: PairLogps | Callable[[list], PairLogps], beta: float = 0.1,
                           keep: str = "highest", unit: str = "example") -> tuple[list, dict[str, Any]]:
    """Rank pairs by the DPO implicit reward margin under the current policy against the reference (see the
    module docstring for `keep`). `mean_key` in the stats is the mean implicit margin of the kept pairs
    (for `keep="potential"` too); `implicit_margins` holds every pair's margin, in example order."""
    if keep not in ("highest", "lowest", "potential"):
        raise AlignpipeError(f"implicit_margin: keep must be highest, lowest or potential, got {keep!r}")
    margins = implicit_margins(examples, logps, beta)
    if keep == "highest":
        rank = margins
    elif keep == "lowest":
        rank = -margins
    else:  # both margins put on one scale before subtracting (methods.md 1.17)
        rank = _z(np.array([e.margin for e in examples], dtype=np.float64)) - _z(margins)
    kept_idx = top_within_budget(examples, list(range(len(examples))), rank.tolist(), budget, unit)
    stats = _stats("implicit_margin", examples, kept_idx, margins.tolist(),
                   {"over_budget": len(examples) - len(kept_idx)})
    stats["implicit_margins"] = margins.tolist()
    return [examples[i] for i in kept_idx], stats


DEFAULT_KEEP = {"judge_disagreement": "least", "ensemble_variance": "least", "entropy": "most"}


def uncertainty_select(examples: list, budget: int | None, *,
                       values: Sequence[float] | Callable[[Any], float], keep: str | None = None,
                       measure: str | None = None, unit: str = "example") -> tuple[list, dict[str, Any]]:
    """Rank by an uncertainty value per example and keep the least (`keep="least"`) or the most (`"most"`)
    uncertain within the budget. `keep=None` takes the default of `measure` (DEFAULT_KEEP); a value that is
    NaN (no information: e.g. no two verdicts to compare) is dropped as `no_value`."""
    if keep is None:
        if measure not in DEFAULT_KEEP:
            raise AlignpipeError(f"uncertainty: give keep (least/most) or a measure of {', '.join(DEFAULT_KEEP)}; "
                                 f"got measure={measure!r}")
        keep = DEFAULT_KEEP[measure]
    if keep not in ("least", "most"):
        raise AlignpipeError(f"uncertainty: keep must be least or most, got {keep!r}")
    vals = [float(values(e)) for e in examples] if callable(values) else [float(v) for v in values]
    if len(vals) != len(examples):
        raise AlignpipeError(f"uncertainty: {len(vals)} values for {len(examples)} examples")
    passed = [i for i, v in enumerate(vals) if not math.isnan(v)]
    rank = [-v if keep == "least" else v for v in vals]
    kept_idx = top_within_budget(examples, passed, rank, budget, unit)
    stats = _stats("uncertainty", examples, kept_idx, vals,
                   {"no_value": len(examples) - len(passed), "over_budget": len(passed) - len(kept_idx)})
    stats["keep"] = keep
    return [examples[i] for i in kept_idx], stats


SELECTION_RULES: dict[str, Callable[..., tuple[list, dict[str, Any]]]] = {
    "random": random_select,
    "score_margin": score_margin_select,
    "implicit_margin": implicit_margin_select,
    "uncertainty": uncertainty_select,
}


def select(rule: str, examples: list, budget: int | None = None, **params: Any) -> tuple[list, dict[str, Any]]:
    """Apply the selection rule named `rule` (a key of SELECTION_RULES) with its keyword parameters."""
    fn = SELECTION_RULES.get(rule)
    if fn is None:
        raise AlignpipeError(f"unknown selection rule {rule!r}; known: {', '.join(SELECTION_RULES)}")
    signature = {k: v for k, v in inspect.signature(fn).parameters.items() if k not in ("examples", "budget")}
    unknown = sorted(set(params) - set(signature))
    if unknown:
        raise AlignpipeError(f"selection rule {rule!r} has no parameter {', '.join(unknown)}; "
                             f"it takes {', '.join(sorted(signature))}")
    missing = sorted(k for k, v in signature.items() if v.default is inspect.Parameter.empty and k not in params)
    if missing:
        raise AlignpipeError(f"selection rule {rule!r} needs {', '.join(missing)}")
    if not examples:
        return [], _stats(rule, [], [], None, {})
    return fn(examples, budget, **params)


# ---------------------------------------------------------------- DAPO dynamic sampling


def tied_prompts(groups: dict[str, Sequence[float]], tol: float = 0.0) -> list[str]:
    """Prompt ids whose scores all tie (max - min <= tol) or that have fewer than two scores: their group-
    normalised advantages are all 0, so they carry no gradient (DAPO, arXiv 2503.14476, section 3.2)."""
    return [pid for pid, s in groups.items() if len(s) < 2 or max(s) - min(s) <= tol]


def dynamic_fill(groups: dict[str, Sequence[float]], target: int,
                 sample: Callable[[int], dict[str, Sequence[float]]] | None = None, *,
                 max_attempts: int = 3, max_new_prompts: int | None = None, oversample: float = 1.0,
                 tol: float = 0.0) -> tuple[list[str], dict[str, Any]]:
    """DAPO's dynamic sampling at the prompt level: keep the prompts whose group is informative (not all
    tied) and, while fewer than `target` are, ask `sample(n)` for n fresh prompts, sampled and judged by the
    caller (prompt id -> its group's scores; fewer or none when its pool runs out), until the batch is full,
    `sample` has been called `max_attempts` times, `max_new_prompts` fresh prompts were drawn, or the pool is
    empty. n = ceil(missing * oversample), within `max_new_prompts`.

    Returns the informative prompt ids (the initial ones first, then the fresh ones, in order; cut to
    `target`: the surplus is counted in `surplus`) and stats: attempts, requested, sampled (fresh prompts
    received), replaced (all-tied prompts left out, initial and fresh), final (count kept), target, full,
    stop (full / max_attempts / max_new_prompts / pool_empty / no_sampler)."""
    if target < 0 or max_attempts < 0 or oversample < 1.0:
        raise AlignpipeError(f"dynamic sampling: need target >= 0, max_attempts >= 0 and oversample >= 1; got "
                             f"target={target}, max_attempts={max_attempts}, oversample={oversample}")
    seen = dict(groups)
    tied = set(tied_prompts(groups, tol))
    kept = [pid for pid in groups if pid not in tied]
    stats: dict[str, Any] = {"attempts": 0, "requested": 0, "sampled": 0, "replaced": len(tied)}
    stop = "full"
    while len(kept) < target:
        if sample is None:
            stop = "no_sampler"
            break
        if stats["attempts"] >= max_attempts:
            stop = "max_attempts"
            break
        n = math.ceil((target - len(kept)) * oversample)
        if max_new_prompts is not None:
            n = min(n, max_new_prompts - stats["sampled"])
            if n <= 0:
                stop = "max_new_prompts"
                break
        stats["attempts"] += 1
        stats["requested"] += n
        fresh = {pid: s for pid, s in dict(sample(n)).items() if pid not in seen}  # a repeat is no new prompt
        if not fresh:
            stop = "pool_empty"
            break
        seen.update(fresh)
        stats["sampled"] += len(fresh)
        fresh_tied = set(tied_prompts(fresh, tol))
        stats["replaced"] += len(fresh_tied)
        kept += [pid for pid in fresh if pid not in fresh_tied]
    stats.update(surplus=max(len(kept) - target, 0), final=min(len(kept), target), target=target,
                 full=len(kept) >= target, stop=stop)
    return kept[:target], stats
