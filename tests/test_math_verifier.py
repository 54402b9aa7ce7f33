import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from alignpipe.data.gsm8k import final_answer
from alignpipe.evaluation.math_verifier import VerificationError, answers_match, extract_answer, math_verifier
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


# ---------------------------------------------------------------- issue 12: known answers for each finding

A400 = "7" * 400
B400 = "7" * 399 + "8"  # float(A400) == float(B400): the old comparison called these equal


@pytest.mark.parametrize("text, expected", [
    ("so x = 1.5e3", "1.5e3"),  # was "3"
    ("it is 1.5E+3 metres", "1.5E+3"),
    ("we get $1.5 \\times 10^{3}$", "1.5 \\times 10^{3}"),
    ("about 1.5 x 10^3 people", "1.5 x 10^3"),
    ("the answer is 2.5e-2", "2.5e-2"),
    ("the answer is 2^{10}", "2^{10}"),  # a power stays whole: never "2"
    ("3 x 10 = 30", "30"),  # "x 10" without a power is not scientific notation
    ("a total of 1,234,567 votes", "1234567"),
    ("a total of 1\\,234\\,567 votes", "1234567"),
    ("so 1{,}234", "1234"),
    ("#### 1\\,234", "1234"),
    ("the pair is 1,2", "1,2"),  # ambiguous: kept as written, never 12
    ("#### 12,34", "12,34"),
    ("counts: 1, 2, 3", "3"),  # a comma and a space separate numbers
    ("it falls to \u22121,2", "\u22121,2"), ("it falls to \u22121,500", "\u22121500"),  # a typeset minus
])
def test_extract_answer_reads_one_number(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("pred, gold, ok", [
    (A400, B400, False), (A400, A400, True), (B400, A400 + ".0", False), ("-" + A400, A400, False),
    ("1.5e3", "1500", True), ("1500", "1.5e3", True), ("1.5e3", "3", False), ("1.5E+3", "1500", True),
    ("1.5 \\times 10^{3}", "1500", True), ("1.5 x 10^3", "1500", True), ("1.5 \\cdot 10^{-3}", "0.0015", True),
    ("10^{3}", "1000", True), ("1.5e3", "1501", False), ("1.5e999999999", "15e999999998", True),
    ("1,234,567", "1234567", True), ("1\\,234", "1234", True), ("1\\,234\\,567", "1234567", True),
    ("1,2", "12", False), ("1,2", "1.2", False), ("12", "1,2", False), ("1,2345", "12345", False),
    ("1,234.5", "1234.5", True),
    ("\\frac{1}{3}", "0.333333", False), ("-\\frac{1}{2}", "-0.5", True), ("2/6", "\\frac{1}{3}", True),
    ("\\frac{3000}{2}", "1.5e3", True), ("\\$18", "18", True), ("$42$", "42", True), ("42.", "42", True),
    ("\u22121500", "-1.5e3", True), ("\u22121,2", "-12", False),
    ("1,2", "1, 2", True),  # an ambiguous pair still matches a list-valued reference (symbolically)
])
def test_answers_match_exactly(pred, gold, ok):
    assert answers_match(pred, gold) is ok


SYMBOLIC = [("\\frac{1}{2}", "0.5", True), ("0.5", "\\frac{1}{2}", True), ("\\sqrt{\\frac{1}{4}}", "0.5", True),
            ("2\\sqrt{2}", "\\sqrt{8}", True), ("\\frac{\\pi}{2}", "\\pi/2", True), ("x+1", "2", False),
            ("\\sqrt{3}", "\\sqrt{2}", False)]


def test_same_verdict_on_the_main_thread_and_in_a_thread_pool():
    """math-verify's signal timeout refused non-main threads and the error was swallowed: every LaTeX
    answer judged from a worker thread was False. Each thread now gets the main thread's verdict."""
    from alignpipe.evaluation.symbolic_math import symbolic_match

    symbolic_match.cache_clear()
    main = [answers_match(p, g) for p, g, _ in SYMBOLIC]
    symbolic_match.cache_clear()  # the threads must verify, not read the main thread's answers
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda case: answers_match(case[0], case[1]), SYMBOLIC))
        prompt = Prompt(id="p", prompt="?", reference="0.5")
        judged = pool.submit(math_verifier, prompt,
                             Candidate(prompt_id="p", id="c", completion="\\boxed{\\sqrt{\\frac{1}{4}}}")).result()
    assert main == threaded == [ok for _, _, ok in SYMBOLIC]
    assert (judged.status, judged.scores) == ("ok", {"correct": 1.0})


def _judge_in_thread(completion, reference="5"):
    prompt = Prompt(id="p", prompt="?", reference=reference)
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(math_verifier, prompt, Candidate(prompt_id="p", id="c", completion=completion))
        return future.result(timeout=120)  # a hang guard only


def test_power_tower_is_an_error_not_a_verdict():
    for judged in (_judge_in_thread("So \\boxed{9^{9^{9}}}"),
                   math_verifier(Prompt(id="p", prompt="?", reference="5"),
                                 Candidate(prompt_id="p", id="c", completion="\\boxed{9^{9^{9}}}"))):
        assert (judged.status, judged.reason, judged.scores) == ("error", "verification refused: power tower", {})
        assert judged.raw == "9^{9^{9}}"


@pytest.mark.parametrize("text, reason", [
    ("9^9^9", "power tower"), ("2^{100000}", "exponent over 10000"), ("2**{3**4}", "power tower"),
    ("100001!", "factorial over 10000"), ("1e9999999", "exponent over 10000"),
    ("x^2 + y^2", None), ("e^{i\\pi}", None), ("2^{10}", None), ("\\sum_{k=1}^{n} k^{2}", None), ("5!", None),
])
def test_refusal_before_sympy(text, reason):
    from alignpipe.evaluation.symbolic_math import refusal

    got = refusal(text)
    assert (got is None) if reason is None else (got == f"verification refused: {reason}")


def test_slow_expression_times_out_as_an_error_and_the_verifier_recovers():
    """(x+1)^{5000} against x^{5000}+1 passes the refusal rules but takes sympy minutes: past the deadline
    the worker is killed and the judgment is an error; the next comparison gets a fresh worker."""
    judged = _judge_in_thread("\\boxed{(x+1)^{5000}}", reference="x^{5000}+1")
    assert (judged.status, judged.reason, judged.scores) == ("error", "verification timed out", {})
    with pytest.raises(VerificationError, match="timed out"):
        answers_match("(x+1)^{4000}", "x^{4000}+1", deadline_s=0.5)
    assert answers_match("\\sqrt{4}", "2") is True


def test_unreadable_reference_is_an_error():
    judged = math_verifier(Prompt(id="p", prompt="?", reference="\\\\"),
                           Candidate(prompt_id="p", id="c", completion="\\boxed{\\sqrt{2}}"))
    assert (judged.status, judged.reason) == ("error", "reference answer could not be parsed")


def test_step_labels_count_an_undecidable_rollout_as_an_error():
    """Step labels use answers_match too: a refused answer is an error (of the judgment or the rollout)."""
    from alignpipe.evaluation.step_labels import StepLabeler

    class Continue:
        name = "scripted"

        def complete(self, conversations, max_new_tokens=256, temperature=0.0):
            return ["so \\boxed{9^{9^{9}}}", "so \\boxed{5}"][: len(conversations)]

    prompt = Prompt(id="p", prompt="What is 2 + 3?", reference="5")
    tower = Candidate(prompt_id="p", id="c1", completion="2 + 3 = 5.\nSo \\boxed{9^{9^{9}}}")
    rolled = Candidate(prompt_id="p", id="c2", completion="2 + 3 = 5.\nSo \\boxed{5}")
    labeler = StepLabeler(Continue(), rollouts=2, show_progress=False, batch_size=2)
    first, second = labeler.score([(prompt, tower), (prompt, rolled)])
    assert (first.status, first.reason) == ("error", "verification refused: power tower")
    step = json.loads(second.raw)["steps"][0]
    assert (step["n"], step["correct"], step["errors"]) == (1, 1, 1)
