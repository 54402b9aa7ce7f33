"""Self-Instruct's instruction filters (arXiv 2212.10560, section 2.3): a new instruction joins the pool only if
it is not a near-duplicate of any instruction already there and passes a few cheap heuristics.

Rules, checked in this order; the first that fails is the rejection reason:

- `too_short` / `too_long`: fewer than `min_words` or more than `max_words` whitespace-separated words;
- `unsupported`: it mentions something a text-only model cannot see or produce (a whole-word, case-insensitive
  match of a `blocklist` entry: image, graph, picture, file, map, draw, plot, go to, ...);
- `punctuation_start`: its first character is ASCII punctuation;
- `non_ascii_start`: its first character is not ASCII;
- `duplicate`: the same text (case and whitespace ignored) is already in the pool;
- `similar`: its ROUGE-L F-measure with some instruction in the pool is >= `threshold` (0.7 in the paper),
  computed by the `rouge-score` library (its default tokenizer: lower case, alphanumeric tokens, no stemmer).

A kept instruction joins the pool at once, so two near-duplicates in the same batch keep only the first.

Speed: ROUGE-L F = 2 * LCS / (len(a) + len(b)), and the LCS is at most the number of tokens the two share
(counted with multiplicity). A pair whose shared-token bound is already below the threshold cannot reach it, so
its LCS is not computed; the decisions are exactly those of computing every pair.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field

# things a text-only model cannot take in or give out (Self-Instruct's list)
DEFAULT_BLOCKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                     "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
REASONS = ("too_short", "too_long", "unsupported", "punctuation_start", "non_ascii_start", "duplicate", "similar")


def normalize(text: str) -> str:
    """The text an exact-duplicate check compares: lower case, runs of whitespace as one space."""
    return " ".join(text.lower().split())


class _CachingTokenizer:
    """rouge-score's default tokenizer, remembering each text's tokens (pool texts are scored many times)."""

    def __init__(self, use_stemmer: bool = False) -> None:
        from rouge_score import tokenizers  # imports nltk: seconds, so only when a pool is built

        self._inner = tokenizers.DefaultTokenizer(use_stemmer=use_stemmer)
        self._cache: dict[str, list[str]] = {}

    def tokenize(self, text: str) -> list[str]:
        tokens = self._cache.get(text)
        if tokens is None:
            tokens = self._cache[text] = self._inner.tokenize(text)
        return tokens


class RougePool:
    """The instructions kept so far; the highest ROUGE-L F of a new text against any of them."""

    def __init__(self, instructions: list[str] | tuple[str, ...] = (), use_stemmer: bool = False) -> None:
        from rouge_score import rouge_scorer

        self._tokenizer = _CachingTokenizer(use_stemmer)
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=self._tokenizer)
        self.texts: list[str] = []
        self._bags: list[Counter[str]] = []
        self._normalized: set[str] = set()
        for text in instructions:
            self.add(text)

    def __len__(self) -> int:
        return len(self.texts)

    def __contains__(self, text: str) -> bool:
        return normalize(text) in self._normalized

    def add(self, text: str) -> None:
        self.texts.append(text)
        self._bags.append(Counter(self._tokenizer.tokenize(text)))
        self._normalized.add(normalize(text))

    def most_similar(self, text: str, threshold: float | None = None) -> tuple[float, str | None]:
        """(highest ROUGE-L F, that pool text) over the pool. With `threshold`, pairs that provably score below it
        are skipped and the search stops at the first pair that reaches it: a returned score is then the maximum
        only when it is below `threshold` and no skipped pair could beat it, i.e. the decision "below or not" is
        exact, the score a lower bound."""
        bag = Counter(self._tokenizer.tokenize(text))
        n = sum(bag.values())
        best, best_text = 0.0, None
        for other, other_bag in zip(self.texts, self._bags, strict=True):
            total = n + sum(other_bag.values())
            if total == 0:
                continue
            bound = 2 * sum((bag & other_bag).values()) / total
            if bound <= best or (threshold is not None and bound < threshold):
                continue
            score = self._scorer.score(other, text)["rougeL"].fmeasure
            if score > best:
                best, best_text = score, other
                if threshold is not None and best >= threshold:
                    break
        return best, best_text


_PUNCTUATION = set(string.punctuation)


def static_reason(instruction: str, min_words: int = 3, max_words: int = 150,
                  blocklist: tuple[str, ...] | list[str] = DEFAULT_BLOCKLIST) -> str | None:
    """The first rule a lone instruction breaks (everything but `duplicate` and `similar`), or None."""
    words = instruction.split()
    if len(words) < min_words:
        return "too_short"
    if len(words) > max_words:
        return "too_long"
    lowered = instruction.lower()
    if any(re.search(rf"\b{re.escape(word.lower())}\b", lowered) for word in blocklist):
        return "unsupported"
    first = instruction.strip()[0]
    if first in _PUNCTUATION:
        return "punctuation_start"
    if not first.isascii():
        return "non_ascii_start"
    return None


@dataclass
class FilterResult:
    kept: list[str] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)  # reason -> count
    # per candidate, in order: (instruction, "kept" or the reason, highest ROUGE-L F found, that pool text)
    decisions: list[tuple[str, str, float, str | None]] = field(default_factory=list)


def filter_instructions(candidates: list[str], pool: RougePool, *, threshold: float = 0.7, min_words: int = 3,
                        max_words: int = 150, blocklist: tuple[str, ...] | list[str] = DEFAULT_BLOCKLIST,
                        ) -> FilterResult:
    """Run `candidates` through the rules in order; kept ones are added to `pool` (see the module docstring)."""
    result = FilterResult()
    for raw in candidates:
        text = raw.strip()
        reason = "too_short" if not text else static_reason(text, min_words, max_words, blocklist)
        score, similar_to = 0.0, None
        if reason is None and text in pool:
            reason, score = "duplicate", 1.0
        if reason is None:
            score, similar_to = pool.most_similar(text, threshold)
            if score >= threshold:
                reason = "similar"
        if reason is None:
            result.kept.append(text)
            pool.add(text)
        else:
            result.rejected[reason] += 1
        result.decisions.append((text, reason or "kept", score, similar_to))
    return result
