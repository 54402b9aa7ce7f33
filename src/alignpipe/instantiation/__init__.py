"""Stage 3: instantiation. Judgments become training examples (point-, pair- or group-wise, or demonstrations)."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass, field

from alignpipe import AlignpipeError
from alignpipe.records import Candidate, GroupExample, Judgment, PairExample, PointExample, Prompt, SftExample


@dataclass
class BuildStats:
    prompts: int = 0
    examples: int = 0
    skipped_uniform: int = 0  # every candidate of the prompt scored the same: no signal
    skipped_margin: int = 0
    skipped_incomplete: int = 0  # groups with a candidate that has no ok judgment (group instantiation)
    # candidates left out because their judgment was not `ok` (or missing), by status: a judge failure is
    # never a training signal (it would otherwise score 0 and become the rejected response)
    judgments_not_ok: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def score_of(judgment: Judgment | None, dim: str | None = None) -> float:
    """A candidate's scalar score: the mean of its criteria, or criterion `dim` alone when given; missing or
    errored judgments (and a judgment without `dim`) score 0."""
    if judgment is None or judgment.status == "error" or not judgment.scores:
        return 0.0
    if dim is not None:
        return float(judgment.scores.get(dim, 0.0))
    return sum(judgment.scores.values()) / len(judgment.scores)


def dims_of(judgment: Judgment | None) -> dict[str, float]:
    """Every named score dimension of a judgment (empty when missing or errored), carried onto examples so
    that objectives reading several rewards (MODPO margins, Safe-RLHF costs) can pick theirs."""
    if judgment is None or judgment.status == "error":
        return {}
    return {k: float(v) for k, v in judgment.scores.items()}


def _check_dim(judgments: list[Judgment], dim: str | None) -> None:
    """A `dim` that no judgment carries is a recipe typo, not a score of 0 everywhere."""
    if dim is None or not judgments or any(dim in j.scores for j in judgments):
        return
    known = sorted({k for j in judgments for k in j.scores})
    raise AlignpipeError(f"instantiation.score: no judgment has a score named {dim!r}; they have {known or 'none'}")


def _grouped(prompts: list[Prompt], candidates: list[Candidate], judgments: list[Judgment], dim: str | None = None):
    """Per prompt, its candidates with an `ok` judgment as (candidate, scalar score, every score dimension);
    and the candidates left out, counted by the status of their judgment (`missing` when none).

    Only single-candidate judgments score a candidate; pairwise verdicts (two candidate ids) are raw material
    that `evaluation.pairwise_groups` has already turned into per-candidate judgments."""
    _check_dim(judgments, dim)
    by_candidate = {j.candidate_ids[0]: j for j in judgments if len(j.candidate_ids) == 1}
    groups: dict[str, list[tuple[Candidate, float, dict[str, float]]]] = defaultdict(list)
    not_ok: dict[str, int] = defaultdict(int)
    for c in candidates:
        j = by_candidate.get(c.id)
        if j is None or j.status != "ok":
            not_ok["missing" if j is None else j.status] += 1
            continue
        groups[c.prompt_id].append((c, score_of(j, dim), dims_of(j)))
    prompt_by_id = {p.id: p for p in prompts}
    return [(prompt_by_id[pid], group) for pid, group in groups.items()], dict(not_ok)


def best_vs_worst_pairs(
    prompts: list[Prompt], candidates: list[Candidate], judgments: list[Judgment], chat_prompt,  # noqa: ANN001
    min_margin: float = 0.0, seed: int = 0, dim: str | None = None,
) -> tuple[list[PairExample], BuildStats]:
    """Per prompt: the best-scored candidate as chosen, the worst as rejected, margin = score gap.

    Ties among the best (or the worst) are broken at random with the seed. A prompt whose candidates
    all score the same yields no pair; one whose gap is below `min_margin` neither; both are counted.

    `sampled` (SELM's y_ref ~ pi_ref(.|x), arXiv 2405.19332): one of the prompt's sampled candidates drawn
    uniformly, from a separate seeded stream so pair selection is unchanged. The round's candidates are
    samples of the round-start policy, so this is an exact draw from it (at the synthesis temperature);
    it may coincide with chosen or rejected, as in SELM, where y_ref is ranked together with the pair -
    excluding them would select on the score. Offline (dataset) responses are no policy samples: None.
    """
    rng = random.Random(seed)
    sample_rng = random.Random(f"sampled:{seed}")
    grouped, not_ok = _grouped(prompts, candidates, judgments, dim)
    stats = BuildStats(prompts=len(grouped), judgments_not_ok=not_ok)
    pairs = []
    for prompt, group in grouped:
        scores = [s for _, s, _ in group]
        hi, lo = max(scores), min(scores)
        if hi == lo:  # also a prompt left with one judged candidate
            stats.skipped_uniform += 1
            continue
        if hi - lo < min_margin:
            stats.skipped_margin += 1
            continue
        chosen, chosen_dims = rng.choice([(c, d) for c, s, d in group if s == hi])
        rejected, rejected_dims = rng.choice([(c, d) for c, s, d in group if s == lo])
        policy_samples = [c for c, _, _ in group if not c.source.get("offline")]
        sampled = sample_rng.choice(policy_samples) if policy_samples else None
        pairs.append(PairExample(prompt=chat_prompt(prompt), chosen=chosen.completion, rejected=rejected.completion,
                                 margin=hi - lo, prompt_id=prompt.id,
                                 chosen_truncated=chosen.truncated, rejected_truncated=rejected.truncated,
                                 chosen_dims=chosen_dims, rejected_dims=rejected_dims,
                                 sampled=sampled.completion if sampled else None,
                                 sampled_truncated=sampled.truncated if sampled else False))
    stats.examples = len(pairs)
    return pairs, stats


def reward_gap_pairs(
    prompts: list[Prompt], candidates: list[Candidate], judgments: list[Judgment], chat_prompt,  # noqa: ANN001
    eta: float = 0.85, tau: float = 1.0, dim: str | None = None,
) -> tuple[list[PairExample], BuildStats]:
    """RS-DPO's pairs (arXiv 2402.10038, Algorithm 1): per prompt, every ordered pair of candidates (y_j, y_l)
    with sigmoid((r_j - r_l) / tau) > eta becomes (chosen y_j, rejected y_l), margin r_j - r_l. With the
    defaults eta = 0.85, tau = 1 a pair needs a reward gap above logit(0.85) = 1.73. Prompts that yield no
    pair are counted in `skipped_margin` (or `skipped_uniform` when every score ties)."""
    threshold = tau * math.log(eta / (1.0 - eta))  # sigmoid(d / tau) > eta  <=>  d > tau * logit(eta)
    grouped, not_ok = _grouped(prompts, candidates, judgments, dim)
    stats = BuildStats(prompts=len(grouped), judgments_not_ok=not_ok)
    pairs = []
    for prompt, group in grouped:
        scores = [s for _, s, _ in group]
        if max(scores) == min(scores):
            stats.skipped_uniform += 1
            continue
        found = [(w, lo) for w in group for lo in group if w[1] - lo[1] > threshold]
        if not found:
            stats.skipped_margin += 1
        for (cw, sw, dw), (cl, sl, dl) in found:
            pairs.append(PairExample(prompt=chat_prompt(prompt), chosen=cw.completion, rejected=cl.completion,
                                     margin=sw - sl, prompt_id=prompt.id, chosen_truncated=cw.truncated,
                                     rejected_truncated=cl.truncated, chosen_dims=dw, rejected_dims=dl))
    stats.examples = len(pairs)
    return pairs, stats


def groups_with_scores(
    prompts: list[Prompt], candidates: list[Candidate], judgments: list[Judgment], chat_prompt,  # noqa: ANN001
    drop_uniform: bool = True, dim: str | None = None, baselines: dict[str, float] | None = None,
) -> tuple[list[GroupExample], BuildStats]:
    """Per prompt: all k candidates with their scores (GRPO family). Groups whose scores all tie have
    zero advantage everywhere; `drop_uniform` removes them (DAPO's dynamic sampling) and counts them.
    `baselines`: per prompt id, the score of the policy's greedy decode (ReMax's baseline), carried along."""
    grouped, not_ok = _grouped(prompts, candidates, judgments, dim)
    stats = BuildStats(prompts=len(grouped), judgments_not_ok=not_ok)
    sizes = defaultdict(int)
    for c in candidates:
        sizes[c.prompt_id] += 1
    out = []
    for prompt, group in grouped:
        scores = [s for _, s, _ in group]
        if len(group) < sizes[prompt.id]:
            # a candidate without an ok judgment would leave a smaller group: its advantages would be
            # normalised over other samples than its peers', and batches need equal group sizes
            stats.skipped_incomplete += 1
            continue
        if drop_uniform and max(scores) == min(scores):
            stats.skipped_uniform += 1
            continue
        out.append(GroupExample(prompt=chat_prompt(prompt), completions=[c.completion for c, _, _ in group],
                                scores=scores, prompt_id=prompt.id,
                                truncated=[c.truncated for c, _, _ in group], dims=[d for _, _, d in group],
                                baseline_score=(baselines or {}).get(prompt.id)))
    stats.examples = len(out)
    return out, stats


def labelled_points(
    prompts: list[Prompt], candidates: list[Candidate], judgments: list[Judgment], chat_prompt,  # noqa: ANN001
    threshold: float = 0.5, dim: str | None = None,
) -> tuple[list[PointExample], BuildStats]:
    """One example per candidate with its score, labelled desirable when score >= threshold (KTO/BCO).

    Unlike pairs, a prompt whose candidates all tie still teaches something here (all desirable or all
    undesirable), so nothing is skipped."""
    grouped, not_ok = _grouped(prompts, candidates, judgments, dim)
    stats = BuildStats(prompts=len(grouped), judgments_not_ok=not_ok)
    out = [PointExample(prompt=chat_prompt(prompt), completion=c.completion, score=s, label=s >= threshold,
                        prompt_id=prompt.id, truncated=c.truncated, dims=d)
           for prompt, group in grouped for c, s, d in group]
    stats.examples = len(out)
    stats.extra["desirable"] = sum(p.label for p in out)
    return out, stats


def build_examples(cfg, prompts: list[Prompt], candidates: list[Candidate], judgments: list[Judgment],  # noqa: ANN001
                   chat_prompt, seed: int = 0,  # noqa: ANN001
                   baselines: dict[str, float] | None = None) -> tuple[list, BuildStats, type]:
    """Dispatch on `cfg.kind` (config.InstantiationConfig): the examples, their counts, their record type.
    `cfg.score` names the judgment dimension that is the reward (None: the mean of all of them)."""
    if cfg.kind == "pair" and cfg.pairs == "reward_gap":
        examples, stats = reward_gap_pairs(prompts, candidates, judgments, chat_prompt, cfg.gap_eta, cfg.gap_tau,
                                           cfg.score)
        return examples, stats, PairExample
    if cfg.kind == "pair" and cfg.pairs == "divpo":
        from alignpipe.instantiation.divpo import divpo_pairs  # divpo builds on this module's helpers

        examples, stats = divpo_pairs(prompts, candidates, judgments, chat_prompt,
                                      threshold=None if cfg.divpo_rho else cfg.divpo_threshold, rho=cfg.divpo_rho,
                                      diversity=cfg.divpo_diversity, dim=cfg.score, seed=seed)
        return examples, stats, PairExample
    if cfg.kind == "pair":
        examples, stats = best_vs_worst_pairs(prompts, candidates, judgments, chat_prompt, cfg.min_margin, seed,
                                              cfg.score)
        return examples, stats, PairExample
    if cfg.kind == "sft":
        from alignpipe.instantiation.sft import sft_examples  # builds on this module's helpers

        examples, stats = sft_examples(prompts, candidates, judgments, cfg.label_threshold, cfg.score)
        return examples, stats, SftExample
    if cfg.kind == "point":
        examples, stats = labelled_points(prompts, candidates, judgments, chat_prompt, cfg.label_threshold,
                                          cfg.score)
        return examples, stats, PointExample
    examples, stats = groups_with_scores(prompts, candidates, judgments, chat_prompt, cfg.drop_uniform_groups,
                                         cfg.score, baselines)
    return examples, stats, GroupExample
