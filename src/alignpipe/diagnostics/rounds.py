"""Per-round diagnostics: how much information the round's training signal carries.

Computed only from the files of one `round-NN/` directory (and the run's config.yaml for the score
dimension), so any old run can be re-analysed. Five sections, each a plain JSON-safe dict:

- candidates: count, length (tokens, chars), truncation rate, distinct-1/2 (Li et al., arXiv 1510.03055),
  duplicate rate within a prompt, counts per source;
- judgments: score distribution, share of prompts whose candidates all tie, not-ok rates by reason,
  both-order consistency of pairwise verdicts, ensemble disagreement, score-length correlation
  (the length bias that length control corrects, arXiv 2404.04475);
- examples: count, margin (or score / group) distribution, prompts dropped and why (metrics.json);
- training, timing: copied from metrics.json; keys the trainer did not record are listed as missing.

A file that is missing or unreadable makes its section `{"missing": "<file name>"}` (plus a "reason" when the
file exists but cannot be read): a run that died mid-round still gets diagnostics for what it wrote.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import yaml

from alignpipe.evaluation.pairwise_groups import pairwise_stats
from alignpipe.instantiation import score_of
from alignpipe.records import (
    Candidate,
    GroupExample,
    Judgment,
    PairExample,
    PointExample,
    SftExample,
    json_safe,
    read_records,
    write_json,
)
from alignpipe.synthesis.diversity import distinct_n, round_diversity

# the trainer's figures of a round (optimization/trainer.py): KL to the reference and the implicit-reward accuracy
# and margin on the round's own pairs, before and after the round's updates
TRAIN_KEYS = ("loss", "steps", "grad_norm", "tokens_per_s", "step_time_s", "kl_ref_before", "kl_ref_after",
              "reward_acc_before", "reward_acc_after", "reward_margin_before", "reward_margin_after")
DROP_KEYS = ("skipped_uniform", "skipped_margin", "skipped_incomplete")
# the files each section is computed from (the report recomputes a section whose file changed)
SOURCES = ("prompts.parquet", "candidates.parquet", "judgments.parquet", "examples.parquet", "metrics.json")


class _Missing(Exception):
    """A round file that is absent or unreadable; becomes the section `{"missing": name}`."""

    def __init__(self, name: str, reason: str | None = None) -> None:
        super().__init__(name)
        self.section = {"missing": name, **({"reason": reason} if reason else {})}


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def distribution(values: list[float], extra: bool = False) -> dict[str, Any]:
    """n, mean, p10, p50, p90, max (and min, std when `extra`) of `values`; None entries when empty."""
    keys = ("mean", "p10", "p50", "p90", "max") + (("min", "std") if extra else ())
    if not values:
        return {"n": 0, **dict.fromkeys(keys)}
    a = np.asarray(values, dtype=np.float64)
    p10, p50, p90 = np.percentile(a, [10, 50, 90])
    out = {"n": len(a), "mean": a.mean(), "p10": p10, "p50": p50, "p90": p90, "max": a.max()}
    if extra:
        out.update(min=a.min(), std=a.std())
    return {k: v if k == "n" else _finite(float(v)) for k, v in out.items()}


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson correlation; None for fewer than 3 points or a constant variable."""
    if len(x) < 3:
        return None
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return _finite(float(a @ b) / den) if den > 0 else None


def _ranks(x: list[float]) -> list[float]:
    """Ranks 1..n, ties get the mean of their positions (as Spearman's rho needs)."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson of average ranks); None as for `pearson`."""
    return pearson(_ranks(x), _ranks(y)) if len(x) >= 3 else None


def _read(round_dir: Path, name: str, cls: type) -> list:
    path = round_dir / name
    if not path.is_file():
        raise _Missing(name)
    try:
        return read_records(path, cls)
    except Exception as exc:  # noqa: BLE001 - a corrupt file is reported, not raised
        raise _Missing(name, f"unreadable: {type(exc).__name__}: {exc}") from None


def _read_metrics(round_dir: Path) -> dict[str, Any]:
    path = round_dir / "metrics.json"
    if not path.is_file():
        raise _Missing("metrics.json")
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _Missing("metrics.json", f"unreadable: {exc}") from None
    if not isinstance(metrics, dict):
        raise _Missing("metrics.json", "unreadable: not a JSON object")
    return metrics


def _source_name(c: Candidate) -> str:
    """Where a candidate came from: the source's own `source` key, else offline data or the policy."""
    if isinstance(c.source.get("source"), str):
        return c.source["source"]
    return "offline" if c.source.get("offline") else "policy"


def candidate_section(candidates: list[Candidate]) -> dict[str, Any]:
    """Count, lengths, truncation, diversity over all completions, duplicates within a prompt, sources.

    distinct-n, within-prompt overlap and duplicates as the loop's `round_diversity` defines them;
    `distinct_2_within_prompt` is the mean over prompts."""
    texts = [c.completion for c in candidates]
    by_prompt: dict[str, list[str]] = defaultdict(list)
    for c in candidates:
        by_prompt[c.prompt_id].append(c.completion)
    n = len(candidates)
    tokens = [c.num_tokens for c in candidates if c.num_tokens is not None]
    div = round_diversity(candidates) if n else {}
    return {
        "count": n,
        "prompts": len(by_prompt),
        "tokens": distribution(tokens),
        "chars": distribution([len(t) for t in texts]),
        "truncation_rate": sum(c.truncated for c in candidates) / n if n else None,
        **{k: div.get(k) for k in ("distinct_1", "distinct_2", "pairwise_overlap_2", "duplicate_rate")},
        "distinct_2_within_prompt": float(np.mean([distinct_n(g, 2) for g in by_prompt.values()])) if n else None,
        "by_source": dict(Counter(_source_name(c) for c in candidates)),
    }


def _not_ok(judgments: list[Judgment]) -> dict[str, Any]:
    n = len(judgments)
    status = Counter(j.status for j in judgments)
    reasons: dict[str, Counter] = defaultdict(Counter)
    for j in judgments:
        if j.status != "ok":
            reasons[j.status][j.reason or "(no reason)"] += 1
    return {"status": dict(status),
            "invalid_rate": status["invalid"] / n if n else None,
            "error_rate": status["error"] / n if n else None,
            "reasons": {s: dict(c.most_common()) for s, c in reasons.items()}}


def _members(j: Judgment) -> list[dict] | None:
    """The member judgments an ensemble keeps in `raw` (evaluation/ensemble.py), else None."""
    if not j.raw or not j.raw.lstrip().startswith("{"):
        return None
    try:
        raw = json.loads(j.raw)
    except ValueError:
        return None
    members = raw.get("members") if isinstance(raw, dict) else None
    return members if isinstance(members, list) and len(members) > 1 else None


def ensemble_disagreement(judgments: list[Judgment]) -> dict[str, Any] | None:
    """Disagreement of ensemble members, where judgments keep them: per scored candidate, the spread (population
    sd) of the ok members' mean scores; per pairwise verdict, whether the ok members' preferences differ."""
    spreads, split, verdicts = [], 0, 0
    for j in judgments:
        members = _members(j)
        if members is None:
            continue
        ok = [m for m in members if isinstance(m, dict) and m.get("status") == "ok"]
        if len(j.candidate_ids) == 1:
            values = [sum(m["scores"].values()) / len(m["scores"]) for m in ok if m.get("scores")]
            if len(values) > 1:
                spreads.append(float(np.std(values)))
        else:
            prefs = {m.get("preference") for m in ok if m.get("preference")}
            if prefs:
                verdicts += 1
                split += len(prefs) > 1
    if not spreads and not verdicts:
        return None
    return {"scored": len(spreads), "member_sd_mean": float(np.mean(spreads)) if spreads else None,
            "verdicts": verdicts, "split_share": split / verdicts if verdicts else None}


def judgment_section(judgments: list[Judgment], candidates: list[Candidate] | None,
                     dim: str | None = None) -> dict[str, Any]:
    """Scores of the per-candidate judgments and how reliable the judge was.

    tie_share: among prompts with at least two ok-scored candidates, the share whose scores are all equal
    (such a prompt gives no pair and a zero group advantage). Length correlation uses tokens when every
    candidate has `num_tokens`, else characters."""
    single = [j for j in judgments if len(j.candidate_ids) == 1]
    raw = [j for j in judgments if len(j.candidate_ids) == 2]
    ok = [j for j in single if j.status == "ok"]
    scores = [score_of(j, dim) for j in ok]
    values = np.asarray(scores, dtype=np.float64)
    hist = None
    if len(values):
        counts, edges = np.histogram(values, bins=min(10, max(1, len(set(scores)))))
        hist = {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
    by_prompt: dict[str, list[float]] = defaultdict(list)
    for j, s in zip(ok, scores, strict=True):
        by_prompt[j.prompt_id].append(s)
    scored = [v for v in by_prompt.values() if len(v) >= 2]
    out: dict[str, Any] = {
        "judge": judgments[0].judge if judgments else None,
        "count": len(single),
        "ok": len(ok),
        "score_dim": dim,
        "scores": distribution(scores, extra=True),
        "histogram": hist,
        "prompts_scored": len(scored),
        "tie_share": sum(max(v) == min(v) for v in scored) / len(scored) if scored else None,
        **_not_ok(single),
        "pairwise": None,
        "ensemble": ensemble_disagreement(judgments),
    }
    if raw:
        out["pairwise"] = {**pairwise_stats(raw), **{f"raw_{k}": v for k, v in _not_ok(raw).items()}}
    if candidates is None:
        out["length_correlation"] = {"missing": "candidates.parquet"}
    else:
        by_id = {c.id: c for c in candidates}
        pairs = [(s, by_id[j.candidate_ids[0]]) for j, s in zip(ok, scores, strict=True) if j.candidate_ids[0] in by_id]
        use_tokens = bool(pairs) and all(c.num_tokens is not None for _, c in pairs)
        lengths = [float(c.num_tokens if use_tokens else len(c.completion)) for _, c in pairs]
        ys = [s for s, _ in pairs]
        out["length_correlation"] = {"unit": "tokens" if use_tokens else "chars", "n": len(pairs),
                                     "pearson": pearson(ys, lengths), "spearman": spearman(ys, lengths)}
    return out


def _examples_kind(path: Path) -> type:
    names = set(pq.read_schema(path).names)
    if "chosen" in names:
        return PairExample
    if "completions" in names:
        return GroupExample
    if "messages" in names:
        return SftExample
    return PointExample


def example_section(round_dir: Path, metrics: dict | None) -> dict[str, Any]:
    """Examples and their margins (pairs), scores and labels (points) or group sizes and spreads (groups); the
    prompts dropped by instantiation and why, from metrics.json."""
    path = round_dir / "examples.parquet"
    if not path.is_file():
        raise _Missing("examples.parquet")
    try:
        cls = _examples_kind(path)
    except Exception as exc:  # noqa: BLE001
        raise _Missing("examples.parquet", f"unreadable: {type(exc).__name__}: {exc}") from None
    examples = _read(round_dir, "examples.parquet", cls)
    out: dict[str, Any] = {"kind": {PairExample: "pair", PointExample: "point", GroupExample: "group",
                                    SftExample: "sft"}[cls], "count": len(examples)}
    if cls is SftExample:
        out["score"] = distribution([e.score for e in examples], extra=True)
        out["assistant_turns"] = distribution([sum(m["role"] == "assistant" for m in e.messages) for e in examples])
    elif cls is PairExample:
        out["margin"] = distribution([e.margin for e in examples], extra=True)
    elif cls is PointExample:
        out["score"] = distribution([e.score for e in examples], extra=True)
        out["desirable_share"] = sum(e.label for e in examples) / len(examples) if examples else None
    else:
        out["group_size"] = distribution([len(e.completions) for e in examples])
        out["score_sd"] = distribution([float(np.std(e.scores)) for e in examples if e.scores])
    if metrics is None:
        out["dropped"] = {"missing": "metrics.json"}
        return out
    prompts = metrics.get("prompts")
    reasons = {k: metrics[k] for k in DROP_KEYS if isinstance(metrics.get(k), int | float)}
    not_ok = metrics.get("judgments_not_ok")
    dropped = sum(reasons.values())
    out["dropped"] = {
        "prompts": prompts, "dropped": dropped,
        "share": dropped / prompts if isinstance(prompts, int | float) and prompts else None,
        "reasons": reasons,
        "missing": [k for k in DROP_KEYS if k not in reasons] or None,
        # candidates (not prompts) left out because their judgment was not ok, by status
        "candidates_not_ok": not_ok if isinstance(not_ok, dict) else None,
    }
    return out


def training_section(metrics: dict) -> dict[str, Any]:
    """The trainer's figures of the round, as recorded; absent keys are listed, never filled in."""
    train = metrics.get("train")
    if not isinstance(train, dict):
        return {"missing": "metrics.json: train"}
    out = {k: train[k] for k in TRAIN_KEYS if k in train}
    out["missing"] = [k for k in TRAIN_KEYS if k not in train]
    out["other"] = {k: v for k, v in train.items() if k not in TRAIN_KEYS and isinstance(v, int | float)}
    return out


def timing_section(metrics: dict) -> dict[str, Any]:
    out = {k: metrics[k] for k in ("stage_seconds", "stage_peak_rss_mb", "peak_rss_mb") if k in metrics}
    out["missing"] = [k for k in ("stage_seconds", "stage_peak_rss_mb", "peak_rss_mb") if k not in metrics]
    return out


def _score_dim(round_dir: Path, recipe: dict | None) -> str | None:
    """instantiation.score of the recipe (or of the run's config.yaml beside the round): the reward dimension."""
    if recipe is None:
        try:
            recipe = yaml.safe_load((round_dir.parent / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            recipe = None
    inst = recipe.get("instantiation") if isinstance(recipe, dict) else None
    return inst.get("score") if isinstance(inst, dict) else None


def round_index(round_dir: Path) -> int | None:
    m = re.fullmatch(r"round-(\d+)", round_dir.name)
    return int(m.group(1)) if m else None


def round_diagnostics(round_dir: Path, recipe: dict | None = None) -> dict[str, Any]:
    """All sections for one round directory (see the module docstring); never raises for missing files."""
    round_dir = Path(round_dir)
    dim = _score_dim(round_dir, recipe)
    out: dict[str, Any] = {"round": round_index(round_dir)}
    candidates = None
    try:
        candidates = _read(round_dir, "candidates.parquet", Candidate)
        out["candidates"] = candidate_section(candidates)
    except _Missing as m:
        out["candidates"] = m.section
    try:
        out["judgments"] = judgment_section(_read(round_dir, "judgments.parquet", Judgment), candidates, dim)
    except _Missing as m:
        out["judgments"] = m.section
    metrics = None
    try:
        metrics = _read_metrics(round_dir)
    except _Missing as m:
        out["training"] = out["timing"] = m.section
    try:
        out["examples"] = example_section(round_dir, metrics)
    except _Missing as m:
        out["examples"] = m.section
    if metrics is not None:
        out["training"] = training_section(metrics)
        out["timing"] = timing_section(metrics)
        # what the synthesis stage recorded: diversity, selection, dynamic sampling, verbalized parses
        out["synthesis"] = {k: metrics[k] for k in ("diversity", "selection", "dynamic_sampling", "sampling")
                            if k in metrics}
    keys = ("round", "candidates", "judgments", "examples", "training", "timing", "synthesis")
    return json_safe({k: out[k] for k in keys if k in out})


def write_round_diagnostics(round_dir: Path, recipe: dict | None = None) -> dict[str, Any]:
    """Compute the round's diagnostics and write them atomically to `round-NN/diagnostics.json`."""
    diag = round_diagnostics(round_dir, recipe)
    write_json(Path(round_dir) / "diagnostics.json", diag)
    return diag
