"""Stage 3: instantiation. Judgments become training examples (point-, pair- or group-wise)."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

from alignpipe.records import Candidate, GroupExample, Judgment, PairExample, PointExample, Prompt


@dataclass
class BuildStats:
    prompts: int = 0
    examples: int = 0
    skipped_uniform: int = 0  # every candidate of the prompt scored the same: no signal
    skipped_margin: int = 0
    judgments_not_ok: int = 0
    extra: dict = field(default_factory=dict)


def score_of(judgment: Judgment | None) -> float:
    """A candidate's scalar score: the mean of its criteria; missing or errored judgments score 0."""
    if judgment is None or judgment.status == "error" or not judgment.scores:
        return 0.0
    return sum(judgment.scores.values()) / len(judgment.scores)


def _grouped(prompts: list[Prompt], candidates: list[Candidate], judgments: list[Judgment]):
    by_candidate = {j.candidate_ids[0]: j for j in judgments if len(j.candidate_ids) == 1}
    groups: dict[str, list[tuple[Candidate, float]]] = defaultdict(list)
    for c in candidates:
        groups[c.prompt_id].append((c, score_of(by_candidate.get(c.id))))
    prompt_by_id = {p.id: p for p in prompts}
    not_ok = sum(j.status != "ok" for j in judgments)
    return [(prompt_by_id[pid], group) for pid, group in groups.items()], not_ok


def best_vs_worst_pairs(
    prompts: list[Prompt], candidates: list[Candidate], judgments: list[Judgment], chat_prompt,  # noqa: ANN001
    min_margin: float = 0.0, seed: int = 0,
) -> tuple[list[PairExample], BuildStats]:
    """Per prompt: the best-scored candidate as chosen, the worst as rejected, margin = score gap.

    Ties among the best (or the worst) are broken at random with the seed. A prompt whose candidates
    all score the same yields no pair; one whose gap is below `min_margin` neither; both are counted.
    """
    rng = random.Random(seed)
    grouped, not_ok = _grouped(prompts, candidates, judgments)
    stats = BuildStats(prompts=len(grouped), judgments_not_ok=not_ok)
    pairs = []
    for prompt, group in grouped:
        scores = [s for _, s in group]
        hi, lo = max(scores), min(scores)
        if hi == lo:
            stats.skipped_uniform += 1
            continue
        if hi - lo < min_margin:
            stats.skipped_margin += 1
            continue
        chosen = rng.choice([c for c, s in group if s == hi])
        rejected = rng.choice([c for c, s in group if s == lo])
        pairs.append(PairExample(prompt=chat_prompt(prompt), chosen=chosen.completion, rejected=rejected.completion,
                                 margin=hi - lo, prompt_id=prompt.id,
                                 chosen_truncated=chosen.truncated, rejected_truncated=rejected.truncated))
    stats.examples = len(pairs)
    return pairs, stats


def groups_with_scores(
    prompts: list[Prompt], candidates: list[Candidate], judgments: list[Judgment], chat_prompt,  # noqa: ANN001
    drop_uniform: bool = True,
) -> tuple[list[GroupExample], BuildStats]:
    """Per prompt: all k candidates with their scores (GRPO family). Groups whose scores all tie have
    zero advantage everywhere; `drop_uniform` removes them (DAPO's dynamic sampling) and counts them."""
    grouped, not_ok = _grouped(prompts, candidates, judgments)
    stats = BuildStats(prompts=len(grouped), judgments_not_ok=not_ok)
    out = []
    for prompt, group in grouped:
        scores = [s for _, s in group]
        if drop_uniform and max(scores) == min(scores):
            stats.skipped_uniform += 1
            continue
        out.append(GroupExample(prompt=chat_prompt(prompt), completions=[c.completion for c, _ in group],
                                scores=scores, prompt_id=prompt.id,
                                truncated=[c.truncated for c, _ in group]))
    stats.examples = len(out)
    return out, stats


def labelled_points(
    prompts: list[Prompt], candidates: list[Candidate], judgments: list[Judgment], chat_prompt,  # noqa: ANN001
    threshold: float = 0.5,
) -> tuple[list[PointExample], BuildStats]:
    """One example per candidate with its score, labelled desirable when score >= threshold (KTO/BCO).

    Unlike pairs, a prompt whose candidates all tie still teaches something here (all desirable or all
    undesirable), so nothing is skipped."""
    grouped, not_ok = _grouped(prompts, candidates, judgments)
    stats = BuildStats(prompts=len(grouped), judgments_not_ok=not_ok)
    out = [PointExample(prompt=chat_prompt(prompt), completion=c.completion, score=s, label=s >= threshold,
                        prompt_id=prompt.id, truncated=c.truncated)
           for prompt, group in grouped for c, s in group]
    stats.examples = len(out)
    stats.extra["desirable"] = sum(p.label for p in out)
    return out, stats


def build_examples(cfg, prompts: list[Prompt], candidates: list[Candidate], judgments: list[Judgment],  # noqa: ANN001
                   chat_prompt, seed: int = 0) -> tuple[list, BuildStats, type]:  # noqa: ANN001
    """Dispatch on `cfg.kind` (config.InstantiationConfig): the examples, their counts, their record type."""
    if cfg.kind == "pair":
        examples, stats = best_vs_worst_pairs(prompts, candidates, judgments, chat_prompt, cfg.min_margin, seed)
        return examples, stats, PairExample
    if cfg.kind == "point":
        examples, stats = labelled_points(prompts, candidates, judgments, chat_prompt, cfg.label_threshold)
        return examples, stats, PointExample
    examples, stats = groups_with_scores(prompts, candidates, judgments, chat_prompt, cfg.drop_uniform_groups)
    return examples, stats, GroupExample
