"""Instruction-following evaluation: the format rules with known answers, the built-in prompt set, the scorer
against hand-computed values."""

from __future__ import annotations

import pytest

from alignpipe.data.ifeval import constraint_kind, ifeval_scores, load_ifeval_prompts
from alignpipe.evaluation.rules import rule_from_spec, rule_verifier, ruleset_from_spec
from alignpipe.evaluation.rules_format import (
    FIELDS,
    all_lowercase,
    all_uppercase,
    bullet_count,
    count_paragraphs,
    count_sentences,
    ends_with,
    paragraph_count,
    placeholder_count,
    section_count,
    sentence_count,
    starts_with,
    title,
    word_frequency,
)
from alignpipe.records import Candidate, Prompt


@pytest.mark.parametrize(("text", "n"), [
    ("One. Two! Three?", 3),
    ("No end punctuation", 1),
    ("Pi is 3.14 today. Yes.", 2),  # a decimal point is not a sentence end
    ('He said "stop." Then left.', 2),  # a closing quote after the full stop
    ("A heading\nThe body. More body.", 3),  # a line break ends a sentence
    ("Wait... what?! Fine.", 3),
    ("   ", 0),
    ("...", 0),
])
def test_count_sentences(text: str, n: int) -> None:
    assert count_sentences(text) == n


@pytest.mark.parametrize(("text", "n"), [
    ("one\n\ntwo\n\nthree", 3),
    ("one\ntwo lines, one paragraph", 1),
    ("\n\none\n  \t\ntwo\n\n\n\n", 2),  # whitespace-only lines separate; leading/trailing blanks do not count
    ("", 0),
])
def test_count_paragraphs(text: str, n: int) -> None:
    assert count_paragraphs(text) == n


@pytest.mark.parametrize(("rule", "text", "expected"), [
    (sentence_count(2, 2), "Hi there. How are you?", True),
    (sentence_count(2, 2), "Hi there.", False),
    (sentence_count(max_sentences=1), "One. Two.", False),
    (paragraph_count(3, 3), "a\n\nb\n\nc", True),
    (paragraph_count(3, 3), "a\nb\nc", False),
    (paragraph_count(min_paragraphs=2), "a\n\nb\n\nc", True),
    (bullet_count(2, 2), "Tips:\n- water\n* light", True),
    (bullet_count(2, 2), "- one\n- two\n- three", False),
    (bullet_count(min_bullets=1), "**bold** is not a bullet\n-no space either", False),
    (bullet_count(1, 1), "  • indented bullet", True),
    (placeholder_count(min_placeholders=2), "Dear [name], see you on [date].", True),
    (placeholder_count(min_placeholders=2), "Dear [name], see you soon. []", False),  # empty brackets don't count
    (placeholder_count(max_placeholders=0), "No placeholders here.", True),
    (section_count(2, 2), "SECTION 1\nfoo\nSECTION 2\nbar", True),
    (section_count(2, 2), "## SECTION 1\nfoo\n**SECTION 2**\nbar", True),
    (section_count(2, 2), "Section 1\nfoo\nSECTION 2\nbar", False),  # the marker is case-sensitive
    (section_count(2, 2), "SECTION 1 and SECTION 2 on one line", False),  # a section starts a line
    (section_count(1, 1, marker="Day"), "Day 1: beach", True),
    (word_frequency("garden", 2), "Garden gardening garden.", True),
    (word_frequency("garden", 2), "Gardening in the garden.", False),
    (word_frequency("rain", max_count=0), "A brainy train.", True),
    (word_frequency("rain", max_count=0), "Rain, rain.", False),
    (word_frequency("ice cream", 1), "I want ice cream!", True),
    (all_lowercase(), "hello there, 42 friends!", True),
    (all_lowercase(), "hello There", False),
    (all_lowercase(), "123 ...", False),  # no letters at all is no lowercase text
    (all_uppercase(), "HELLO, WORLD 2!", True),
    (all_uppercase(), "HELLO, World", False),
    (all_uppercase(), "", False),
    (starts_with("Dear"), "  Dear Sam,", True),
    (starts_with("Dear"), "Hi Sam, dear", False),
    (starts_with("Dear"), "dear Sam", False),
    (starts_with("Dear", case_sensitive=False), "dear Sam", True),
    (ends_with("See you soon!"), "Bye for now. See you soon!  \n", True),
    (ends_with("See you soon!"), "See you soon! :)", False),
    (ends_with("See you soon!"), "See you soon", False),
    (ends_with("see you soon!", case_sensitive=False), "SEE YOU SOON!", True),
    (title(), "<<Autumn Leaves>>\nRed and gold.", True),
    (title(), "<<  >>\nEmpty title.", False),
    (title(), "<Autumn>\nsingle brackets", False),
    (title(), "<<Split\nacross lines>>", False),
])
def test_format_rules_known_answers(rule, text: str, expected: bool) -> None:
    ok, detail = rule(text)
    assert ok is expected, detail
    assert isinstance(detail, str) and detail


@pytest.mark.parametrize(("spec", "text", "expected"), [
    ({"type": "sentence_count", "min": 2}, "One. Two.", True),
    ({"type": "paragraph_count", "max": 1}, "a\n\nb", False),
    ({"type": "bullet_count", "min": 1, "max": 1}, "- one", True),
    ({"type": "placeholder_count", "min": 1}, "[x]", True),
    ({"type": "section_count", "min": 1, "marker": "Question"}, "Question 1\nwhy?", True),
    ({"type": "section_count", "min": 1}, "Question 1\nwhy?", False),  # default marker SECTION
    ({"type": "word_frequency", "word": "love", "min": 3}, "love, Love, LOVE", True),
    ({"type": "all_lowercase"}, "abc", True),
    ({"type": "all_uppercase"}, "abc", False),
    ({"type": "starts_with", "phrase": "Hello,"}, "Hello, you", True),
    ({"type": "ends_with", "phrase": "Thanks.", "case_sensitive": False}, "THANKS.", True),
    ({"type": "title"}, "<<T>>", True),
    # the basic kinds the prompt set reuses
    ({"type": "contains_none", "strings": [","], "name": "no_commas"}, "no commas here", True),
    ({"type": "contains_none", "strings": [","], "name": "no_commas"}, "yes, one", False),
    ({"type": "regex", "pattern": '"[\\s\\S]*"', "fullmatch": True}, ' "quoted\nall" ', True),
    ({"type": "regex", "pattern": '"[\\s\\S]*"', "fullmatch": True}, '"quoted" then not', False),
])
def test_format_specs(spec: dict, text: str, expected: bool) -> None:
    ok, detail = rule_from_spec(spec)(text)
    assert ok is expected, detail


@pytest.mark.parametrize(("spec", "message"), [
    ({"type": "sentence_count"}, "give a minimum, a maximum or both"),
    ({"type": "bullet_count", "min": 3, "max": 2}, "minimum 3 > maximum 2"),
    ({"type": "paragraph_count", "min": "2"}, "field 'min' must be an integer"),
    ({"type": "placeholder_count", "min": True}, "field 'min' must be an integer"),
    ({"type": "word_frequency", "min": 1}, "field 'word' is required"),
    ({"type": "word_frequency", "word": " ", "min": 1}, "word must not be empty"),
    ({"type": "section_count", "min": 1, "marker": 3}, "field 'marker' must be a string"),
    ({"type": "starts_with"}, "field 'phrase' is required"),
    ({"type": "ends_with", "phrase": ""}, "phrase must not be empty"),
    ({"type": "title", "phrase": "x"}, "unknown field(s) ['phrase']"),
    ({"type": "all_lowercase", "min": 1}, "unknown field(s) ['min']"),
])
def test_format_spec_errors(spec: dict, message: str) -> None:
    with pytest.raises(ValueError, match="rule ") as info:
        rule_from_spec(spec)
    assert message in str(info.value)
    assert repr(spec["type"]) in str(info.value)


def test_verifier_judges_format_rules() -> None:
    prompt = Prompt(id="p", prompt="q", meta={"rules": [{"type": "all_lowercase"}, {"type": "title"}]})
    j = rule_verifier(prompt, Candidate(prompt_id="p", id="c", completion="<<note>>\nhello"))
    assert j.status == "ok" and j.reason == "passed"
    assert j.scores == {"rule:all_lowercase": 1.0, "rule:title": 1.0, "score": 1.0, "passed": 1.0}


# ---- the built-in prompt set

PROMPTS = load_ifeval_prompts()


def test_prompt_set_loads() -> None:
    assert len(PROMPTS) >= 50
    assert len({p.id for p in PROMPTS}) == len(PROMPTS)
    assert len({p.prompt for p in PROMPTS}) == len(PROMPTS)
    assert all(p.task == "instructions" and p.prompt.strip() for p in PROMPTS)
    assert all(1 <= len(p.meta["rules"]) <= 3 for p in PROMPTS)
    kinds = {constraint_kind(s) for p in PROMPTS for s in p.meta["rules"]}
    assert set(FIELDS) <= kinds  # every format rule kind is exercised by the set


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: p.id)
def test_prompt_rules_are_valid_and_stated(prompt: Prompt) -> None:
    ruleset_from_spec(prompt.meta["rules"])  # raises on a bad spec or repeated rule names
    j = rule_verifier(prompt, Candidate(prompt_id=prompt.id, id="c", completion="anything"))
    assert j.status == "ok", j.reason
    # the constraint's literal parameters appear in the prompt text, so the prompt states what is checked
    for spec in prompt.meta["rules"]:
        needles = {"starts_with": [spec.get("phrase")], "ends_with": [spec.get("phrase")],
                   "word_frequency": [spec.get("word")], "contains_all": spec.get("strings", []),
                   "section_count": [spec.get("marker", "SECTION")]}.get(spec["type"], [])
        for needle in needles:
            assert needle.lower() in prompt.prompt.lower(), (spec, prompt.prompt)


def test_prompt_set_scores_sane_responses() -> None:
    """Two hand-written answers to real prompts of the set: one complies, one breaks each constraint."""
    by_id = {p.id: p for p in PROMPTS}
    note, reminder = by_id["ifeval-001"], by_id["ifeval-002"]
    good = ["Hi Ann, your parcel came while you were out, so I kept it safe. Knock any time. Have a lovely "
            "evening.", "hi all, the recycling goes out on thursday nights. thanks!"]
    bad = ["Hi Ann, I have your parcel. " + "More words here. " * 20 + "Bye.", "Hi all, recycling on Thursday."]
    assert ifeval_scores([note, reminder], good)["prompt_accuracy"] == 1.0
    scores = ifeval_scores([note, reminder], bad)
    assert scores["prompt_accuracy"] == 0.0 and scores["instruction_accuracy"] == 0.0


# ---- the scorer


def _p(pid: str, *rules: dict) -> Prompt:
    return Prompt(id=pid, prompt="task", task="instructions", meta={"rules": list(rules)})


def test_scores_hand_computed() -> None:
    prompts = [
        _p("a", {"type": "word_count", "max": 5}, {"type": "all_lowercase"}),
        _p("b", {"type": "contains_none", "strings": [","], "name": "no_commas"},
           {"type": "ends_with", "phrase": "Bye."}),
        _p("c", {"type": "bullet_count", "min": 2}, {"type": "title"}),
        _p("d", {"type": "word_frequency", "word": "rain", "max": 0, "name": "forbidden_word:rain"}),
        _p("e", {"type": "word_count", "min": 3}),
    ]
    responses = [
        "hello there friend",          # a: 3 words <= 5, lowercase: 2/2
        "Hi, all. Bye.",               # b: a comma (fail), ends with "Bye." (pass): 1/2
        "<<List>>\n- a\n- b",          # c: 2 bullets, title: 2/2
        "Rain again.",                 # d: "rain" once (fail): 0/1
        "too short",                   # e: 2 words < 3 (fail): 0/1
    ]
    scores = ifeval_scores(prompts, responses)
    assert scores["n"] == 5 and scores["n_instructions"] == 8
    assert scores["prompt_accuracy"] == pytest.approx(2 / 5)
    assert scores["instruction_accuracy"] == pytest.approx(5 / 8)
    assert scores["per_kind"] == {"all_lowercase": 1.0, "bullet_count": 1.0, "ends_with": 1.0,
                                  "forbidden_word": 0.0, "no_commas": 0.0, "title": 1.0, "word_count": 0.5}
    assert scores["per_kind_n"] == {"all_lowercase": 1, "bullet_count": 1, "ends_with": 1, "forbidden_word": 1,
                                    "no_commas": 1, "title": 1, "word_count": 2}


def test_scores_ignore_any_mode_and_reject_bad_input() -> None:
    # IFEval's strict prompt accuracy needs every constraint, whatever rules_mode says for training
    p = Prompt(id="m", prompt="t", meta={"rules": [{"type": "title"}, {"type": "all_uppercase"}], "rules_mode": "any"})
    assert ifeval_scores([p], ["<<t>> lower"])["prompt_accuracy"] == 0.0
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        ifeval_scores([p, p], ["x"])
    with pytest.raises(ValueError, match="no prompts"):
        ifeval_scores([], [])
    with pytest.raises(ValueError, match="prompt 'bad'"):
        ifeval_scores([Prompt(id="bad", prompt="t", meta={})], ["x"])
    with pytest.raises(ValueError, match="prompt 'bad'.*unknown rule type"):
        ifeval_scores([_p("bad", {"type": "nope"})], ["x"])
