"""Verbalized sampling (synthesis/verbalized.py): the prompt, and the parser on well-formed, partial and
garbage answers."""

from __future__ import annotations

import pytest

from alignpipe import AlignpipeError
from alignpipe.records import Candidate, Prompt
from alignpipe.synthesis.verbalized import parse_verbalized, verbalized_candidates, verbalized_prompt


def test_prompt_asks_for_n_numbered_answers():
    text = verbalized_prompt("What is 2 + 2?  ", 3)
    assert text == ("What is 2 + 2?\n\nGive 3 different answers to this, as a numbered list (1. to 3.), one answer "
                    "per line, and nothing else.")
    with pytest.raises(AlignpipeError, match="n >= 1"):
        verbalized_prompt("q", 0)


@pytest.mark.parametrize("text", [
    "1. Paris\n2. Lyon\n3. Nice",
    "Sure! Here are three answers:\n\n**1.** Paris\n2) Lyon\n  3: Nice\n",
    "- 1. Paris\n- 2. Lyon\n- 3. Nice",
])
def test_well_formed(text):
    answers, stats = parse_verbalized(text, 3)
    assert answers == ["Paris", "Lyon", "Nice"]
    assert stats == {"expected": 3, "parsed": 3, "empty": 0, "extra": 0, "cut_off": 0, "status": "ok"}


def test_items_keep_their_lines_and_inner_numbers():
    answers, _ = parse_verbalized("1. 2. is not 3\nit is 4\n2. 12.5\n3.5 is a number", 2)
    assert answers == ["2. is not 3\nit is 4", "12.5\n3.5 is a number"]


# real answers of SmolLM2-135M-Instruct asked for 3 answers as a numbered list (this module's wording and two others)
REAL = [
    ("1. 7 + 5 = 12\n2. 7 + 5 = 12\n3. 7 + 5 = 12\n4. 7 + 5 = 12\n5. 7 + 5 = 12\n6. 7 + 5 = 12\n7. 7 + 5 =",
     ["7 + 5 = 12"] * 3, "ok"),
    ("1. A cat\n2. A cat\n3. A cat\n\nThe answer is 3.", ["A cat"] * 3, "ok"),
    ("Here's a numbered list of the mentioned colors:\n\n1. Red\n2. Blue\n3. White\n\nI hope this helps.",
     ["Red", "Blue", "White"], "ok"),
    ("1. Luna\n2. Luna's Cat\n\nList 3 different possible names for a cat.", ["Luna", "Luna's Cat"], "partial"),
]


@pytest.mark.parametrize("text, answers, status", REAL)
def test_real_small_model_answers(text, answers, status):
    got, stats = parse_verbalized(text, 3, truncated=True)
    assert got == answers and stats["status"] == status and stats["cut_off"] == 0


def test_commentary_after_a_blank_line_is_not_part_of_the_last_answer():
    answers, _ = parse_verbalized("1. a\n2. b\n  \nI hope this helps.", 2)
    assert answers == ["a", "b"]
    answers, stats = parse_verbalized("1. a\n2. b\n\nI hope this he", 2, truncated=True)
    assert answers == ["a", "b"] and stats["cut_off"] == 0  # the limit cut the commentary, not an answer
    answers, _ = parse_verbalized("1. a\n2.\n\nsecond answer\n\nsome comment", 2)  # blank lines before its text
    assert answers == ["a", "second answer"]


def test_extra_items_end_the_list():
    answers, stats = parse_verbalized("1. a\n2. b\n3. c\n4. d", 2)
    assert answers == ["a", "b"] and stats["extra"] == 1 and stats["status"] == "ok"


def test_partial_with_last_item_cut_off():
    answers, stats = parse_verbalized("1. Paris\n2. Ly", 3, truncated=True)
    assert answers == ["Paris"]
    assert stats == {"expected": 3, "parsed": 1, "empty": 0, "extra": 0, "cut_off": 1, "status": "partial"}
    answers, stats = parse_verbalized("1. Paris\n2. Ly", 3)  # not truncated: "Ly" is what the model meant
    assert answers == ["Paris", "Ly"] and stats["cut_off"] == 0 and stats["status"] == "partial"
    # all n items ended by an extra marker: the cut-off text was the extra one, the n answers are whole
    answers, stats = parse_verbalized("1. a\n2. b\n3. c", 2, truncated=True)
    assert answers == ["a", "b"] and stats["cut_off"] == 0


def test_out_of_order_numbers_and_empty_items():
    answers, stats = parse_verbalized("1. a\n3. c\n2. b", 3)
    assert answers == ["a\n3. c", "b"] and stats["status"] == "partial"
    answers, stats = parse_verbalized("1.\n2. b\n3. ---", 3)
    assert answers == ["b"] and stats["empty"] == 2


@pytest.mark.parametrize("text", ["", "I don't know.", "The answer is 4.", "2. starts at two\n3. three",
                                  "1.5 2.5 3.5"])
def test_garbage(text):
    answers, stats = parse_verbalized(text, 3)
    assert answers == [] and stats["parsed"] == 0 and stats["status"] == "invalid"


def test_candidates_ids_sources_and_counts():
    prompts = [Prompt("p1", "q1"), Prompt("p2", "q2"), Prompt("p1", "q1"), Prompt("p3", "q3")]
    responses = [
        Candidate("p1", "p1/0", "1. four\n2. 4\n3. IV", source={"model": "m", "temperature": 0.7}),
        Candidate("p2", "p2/0", "1. yes\n2. n", source={"model": "m"}, truncated=True),
        "1. vier\n2. quatre\n3. cuatro\n4. quattro",
        "no list here",
    ]
    cands, stats = verbalized_candidates(prompts, responses, 3, source={"round": 1})
    assert [c.id for c in cands] == ["p1/v0", "p1/v1", "p1/v2", "p2/v0", "p1/v3", "p1/v4", "p1/v5"]
    assert [c.completion for c in cands] == ["four", "4", "IV", "yes", "vier", "quatre", "cuatro"]
    assert cands[0].source == {"model": "m", "temperature": 0.7, "round": 1, "verbalized": True,
                               "response_id": "p1/0", "verbalized_index": 0}
    assert cands[4].source == {"round": 1, "verbalized": True, "verbalized_index": 3}
    assert all(not c.truncated for c in cands)
    assert stats == {"responses": 4, "expected": 12, "parsed": 7, "ok": 2, "partial": 1, "invalid": 1, "empty": 0,
                     "extra": 1, "cut_off": 1, "invalid_rate": 0.25, "parse_rate": pytest.approx(7 / 12)}
    with pytest.raises(AlignpipeError, match="1 responses for 2 prompts"):
        verbalized_candidates(prompts[:2], responses[:1], 3)
