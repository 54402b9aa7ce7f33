import json

import pytest

from alignpipe.data.gsm8k import final_answer
from alignpipe.evaluation.math_verifier import answers_match, extract_answer, math_verifier
from alignpipe.records import Candidate, Prompt


@pytest.mark.parametrize("text, expected", [
    ("The total is 5 + 3 = 8.\n#### 8", "8"),
    ("so we get #### 1,234", "1234"),
    ("Therefore \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("nested \\boxed{\\sqrt{\\frac{1}{4}}} done", "\\sqrt{\\frac{1}{4}}"),
    ("The answer is 42. Later I add 7 and 9.", "42"),
    ("the answer is: -17", "-17"),
    ("25 - 73 = -48", "-48"),
    ("I think 3 apples and 12.5 pears.", "12.5"),
    ("no digits here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("pred, gold, ok", [
    ("42", "42", True), ("42.0", "42", True), ("1,000", "1000", True), ("-3", "3", False),
    ("\\frac{1}{2}", "0.5", True), ("0.5", "\\frac{1}{2}", True), ("x+1", "2", False), ("7", "8", False),
])
def test_answers_match(pred, gold, ok):
    assert answers_match(pred, gold) is ok


def test_verifier_statuses():
    prompt = Prompt(id="p", prompt="What is 2 + 3?", reference="5")
    right = math_verifier(prompt, Candidate(prompt_id="p", id="c1", completion="2 + 3 = 5"))
    wrong = math_verifier(prompt, Candidate(prompt_id="p", id="c2", completion="It is 6."))
    empty = math_verifier(prompt, Candidate(prompt_id="p", id="c3", completion="I don't know."))
    no_ref = math_verifier(Prompt(id="q", prompt="?"), Candidate(prompt_id="q", id="c4", completion="5"))
    assert (right.status, right.scores) == ("ok", {"correct": 1.0})
    assert (wrong.status, wrong.scores) == ("ok", {"correct": 0.0})
    assert (empty.status, empty.scores["correct"], empty.reason) == ("ok", 0.0, "no final answer found")
    assert no_ref.status == "error"


def test_real_gsm8k_solutions_verify_against_their_answer(gsm8k_path):
    """The worked solutions of real GSM8K rows must verify as correct, and a perturbed answer must not."""
    rows = [json.loads(line) for line in gsm8k_path.read_text().splitlines()[:200]]
    for i, row in enumerate(rows):
        gold = final_answer(row["answer"])
        prompt = Prompt(id=str(i), prompt=row["question"], reference=gold)
        good = math_verifier(prompt, Candidate(prompt_id=str(i), id="a", completion=row["answer"]))
        assert good.scores["correct"] == 1.0, (i, row["answer"][-40:])
        bad_answer = row["answer"].rsplit("####", 1)[0] + f"#### {float(gold) + 1:g}"
        bad = math_verifier(prompt, Candidate(prompt_id=str(i), id="b", completion=bad_answer))
        assert bad.scores["correct"] == 0.0
