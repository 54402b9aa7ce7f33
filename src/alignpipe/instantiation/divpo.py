"""DivPO pairs (Diverse Preference Optimization, arXiv 2501.18101): diversity-aware chosen / rejected.

Per prompt, the judged candidates are split by quality: those scoring >= `threshold` may be chosen, those
below it may be rejected (with `rho` instead: the top-rho fraction by score may be chosen, the bottom-rho
fraction rejected, methods.md 1.18; see `_split` for ties). The chosen response is the MOST diverse of the first set, the rejected
the LEAST diverse of the second, so DPO pushes probability toward rare good answers and away from common
bad ones, against the collapse onto one typical answer. With the diversity ignored it is best-vs-worst.

Diversity D(y) (higher = rarer), per prompt among its judged candidates:
- `ngram` (default, no model): 1 - mean Jaccard similarity of y's n-gram set to the other candidates';
- `embedding`: mean cosine distance of y's all-MiniLM-L6-v2 embedding to the others' (synthesis.diversity);
- `logprob`: -log pi(y|x) from `Candidate.logprob` (the paper's model-probability criterion; the sampler
  must have recorded it);
- `word_frequency`: -(mean frequency of y's words in the prompt's pool), the paper's word-frequency one;
- or a callable (texts of one prompt's candidates, the candidates) -> one value per text.
Ties in D are broken at random with the seed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path

from alignpipe import AlignpipeError
from alignpipe.instantiation import BuildStats, _grouped
from alignpipe.records import Candidate, Judgment, PairExample, Prompt
from alignpipe.synthesis import diversity as div

DIVERSITY = ("ngram", "embedding", "logprob", "word_frequency")


def diversity_scores(texts: list[str], candidates: list[Candidate], kind: str | Callable = "ngram", n: int = 2,
                     model_dir: str | Path | None = None) -> list[float]:
    """D per candidate of one prompt (see the module docstring), in the order given."""
    if callable(kind):
        values = [float(v) for v in kind(texts, candidates)]
        if len(values) != len(texts):
            raise AlignpipeError(f"divpo diversity callable returned {len(values)} values for {len(texts)} texts")
        return values
    if kind == "ngram":
        return div.mean_ngram_distance(texts, n)
    if kind == "embedding":
        if len(texts) < 2:
            return [0.0] * len(texts)
        dist = div.cosine_distances(div.embed(texts, model_dir))
        return [float(dist[i].sum() / (len(texts) - 1)) for i in range(len(texts))]  # the diagonal is 0
    if kind == "logprob":
        missing = [c.id for c in candidates if c.logprob is None]
        if missing:
            raise AlignpipeError(f"divpo diversity 'logprob' needs Candidate.logprob; candidate {missing[0]} has none")
        return [-float(c.logprob) for c in candidates]
    if kind == "word_frequency":
        counts = div.word_frequencies(texts)
        total = sum(counts.values()) or 1
        return [-(sum(counts[w] for w in ws) / len(ws) / total) if ws else 0.0
                for ws in (div.tokens(t) for t in texts)]
    raise AlignpipeError(f"unknown divpo diversity {kind!r}; known: {', '.join(DIVERSITY)} or a callable")


def _split(scores: list[float], threshold: float | None, rho: float | None) -> tuple[list[int], list[int]]:
    """Indices that may be chosen / rejected: by absolute threshold, or the top / bottom rho fraction by
    score (m = ceil(rho * k) each; ties at a cut widen that set; when the two would overlap, as with many tied
    scores, the best-scored against the worst-scored ones), so every chosen outscores every rejected."""
    if rho is None:
        return [i for i, s in enumerate(scores) if s >= threshold], [i for i, s in enumerate(scores) if s < threshold]
    m = max(1, math.ceil(rho * len(scores)))
    ranked = sorted(scores)
    hi, lo = ranked[-m], ranked[m - 1]  # the m-th highest and the m-th lowest score
    if hi <= lo:
        hi, lo = ranked[-1], ranked[0]
        if hi == lo:  # every score ties: nothing is better than anything
            return [], []
    return [i for i, s in enumerate(scores) if s >= hi], [i for i, s in enumerate(scores) if s <= lo]


def divpo_pairs(
    prompts: list[Prompt], candidates: list[Candidate], judgments: list[Judgment], chat_prompt: Callable,
    threshold: float | None = 0.5, rho: float | None = None, diversity: str | Callable = "ngram", n: int = 2,
    dim: str | None = None, model_dir: str | Path | None = None, seed: int = 0,
) -> tuple[list[PairExample], BuildStats]:
    """One DivPO pair per prompt: the most diverse candidate scoring >= `threshold` as chosen, the least
    diverse scoring below it as rejected (`rho` in (0, 0.5] instead of `threshold`: the top / bottom rho
    fraction by score). margin = chosen score - rejected score. Only candidates with an `ok` judgment take
    part (as in every builder). A prompt with no candidate above (below) the threshold yields no pair and
    is counted in `stats.extra["no_above"]` (`["no_below"]`); one with neither in both counts in both."""
    if rho is not None and not 0.0 < rho <= 0.5:
        raise AlignpipeError(f"instantiation.divpo rho must be in (0, 0.5], got {rho}")
    if rho is None and threshold is None:
        raise AlignpipeError("instantiation.divpo needs a quality threshold or rho")
    rng = random.Random(seed)
    grouped, not_ok = _grouped(prompts, candidates, judgments, dim)
    stats = BuildStats(prompts=len(grouped), judgments_not_ok=not_ok)
    stats.extra.update(no_above=0, no_below=0)
    pairs = []
    for prompt, group in grouped:
        cands = [c for c, _, _ in group]
        scores = [s for _, s, _ in group]
        above, below = _split(scores, threshold, rho)
        stats.extra["no_above"] += not above
        stats.extra["no_below"] += not below
        if not above or not below:
            continue
        d = diversity_scores([c.completion for c in cands], cands, diversity, n, model_dir)
        best = max(d[i] for i in above)
        worst = min(d[i] for i in below)
        ci = rng.choice([i for i in above if d[i] == best])
        ri = rng.choice([i for i in below if d[i] == worst])
        chosen, rejected = group[ci], group[ri]
        pairs.append(PairExample(prompt=chat_prompt(prompt), chosen=chosen[0].completion,
                                 rejected=rejected[0].completion, margin=chosen[1] - rejected[1],
                                 prompt_id=prompt.id, chosen_truncated=chosen[0].truncated,
                                 rejected_truncated=rejected[0].truncated, chosen_dims=chosen[2],
                                 rejected_dims=rejected[2]))
    stats.examples = len(pairs)
    return pairs, stats
