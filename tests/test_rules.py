"""Rule verifiers with known answers."""

from __future__ import annotations

import json
import re

import pytest

from alignpipe.evaluation.rules import (
    RuleSet,
    char_length,
    contains_all,
    contains_none,
    ends_with_number,
    regex,
    rule_from_spec,
    rule_verifier,
    ruleset_from_spec,
    valid_json,
    word_count,
)
from alignpipe.records import Candidate, Prompt


def cand(text: str) -> Candidate:
    return Candidate(prompt_id="p", id="c", completion=text)


P = Prompt(id="p", prompt="question")


@pytest.mark.parametrize(("rule", "text", "expected"), [
    (regex(r"\bcat\b"), "the cat sat", True),
    (regex(r"\bcat\b"), "concatenate", False),
    (regex(r"yes|no", fullmatch=True), "  yes \n", True),
    (regex(r"yes|no", fullmatch=True), "yes, sure", False),
    (regex(r"hello", flags=re.IGNORECASE), "HeLLo", True),
    (contains_all(["alpha", "beta"]), "alpha and beta", True),
    (contains_all(["alpha", "beta"]), "alpha only", False),
    (contains_all(["Alpha"], case_sensitive=False), "alpha", True),
    (contains_all(["Alpha"]), "alpha", False),
    (contains_none(["as an ai"]), "As an AI, I cannot", False),
    (contains_none(["as an ai"]), "Sure, here it is", True),
    (contains_none(["AI"], case_sensitive=True), "said", True),
    (char_length(3, 5), "  abcd  ", True),
    (char_length(3, 5), "ab", False),
    (char_length(max_chars=5), "abcdef", False),
    (word_count(2, 3), "one two three", True),
    (word_count(2, 3), "one two three four", False),
    (word_count(min_words=2), "one", False),
    (valid_json(), '{"a": 1}', True),
    (valid_json(), "[1, 2]", True),
    (valid_json(), "{'a': 1}", False),
    (valid_json(), '```json\n{"a": 1}\n```', True),
    (valid_json(allow_fence=False), '```json\n{"a": 1}\n```', False),
    (valid_json(required_keys=["a", "b"]), '{"a": 1, "b": 2}', True),
    (valid_json(required_keys=["a", "b"]), '{"a": 1}', False),
    (valid_json(required_keys=["a"]), "[1]", False),
    (ends_with_number(), "The answer is 42", True),
    (ends_with_number(), "The answer is 42.", True),
    (ends_with_number(), "so -3.5", True),
    (ends_with_number(), "total: 1,000!", True),
    (ends_with_number(), "ratio 3/4", True),
    (ends_with_number(), "42 is the answer", False),
    (ends_with_number(), "version x42", False),
    (ends_with_number(), "", False),
])
def test_rules_known_answers(rule, text: str, expected: bool) -> None:
    ok, detail = rule(text)
    assert ok is expected, detail
    assert isinstance(detail, str) and detail


def test_all_any_and_fraction() -> None:
    rules = [regex(r"\d+", name="has_number"), contains_all(["foo"]), word_count(max_words=3)]
    text = "foo 12 bar baz"  # number yes, foo yes, 4 words > 3
    j_all = RuleSet(rules, mode="all")(P, cand(text))
    assert j_all.status == "ok" and j_all.reason == "failed"
    assert j_all.scores == {"rule:has_number": 1.0, "rule:contains_all": 1.0, "rule:word_count": 0.0,
                            "score": pytest.approx(2 / 3), "passed": 0.0}
    assert "word_count (4 words > maximum 3)" in j_all.rationale and "2/3 rules passed" in j_all.rationale
    j_any = RuleSet(rules, mode="any", name="format")(P, cand(text))
    assert j_any.scores["passed"] == 1.0 and j_any.reason == "passed" and j_any.judge == "format"
    j_none = RuleSet(rules, mode="any")(P, cand("nothing here at all"))
    assert j_none.scores["score"] == 0.0 and j_none.scores["passed"] == 0.0
    j_every = RuleSet(rules)(P, cand("foo 7"))
    assert j_every.scores["score"] == 1.0 and j_every.scores["passed"] == 1.0
    assert json.loads(j_every.raw)["has_number"] == {"passed": True, "detail": "matched '7'"}


def test_ruleset_validation() -> None:
    with pytest.raises(ValueError, match="no rules"):
        RuleSet([])
    with pytest.raises(ValueError, match="mode"):
        RuleSet([regex("a")], mode="most")
    with pytest.raises(ValueError, match="unique"):
        RuleSet([word_count(1), word_count(max_words=5)])
    with pytest.raises(ValueError, match="minimum 5 > maximum 2"):
        char_length(5, 2)
    with pytest.raises(ValueError, match="give a minimum"):
        word_count()


def test_rules_from_spec() -> None:
    rules = ruleset_from_spec([
        {"type": "regex", "pattern": "^answer:", "flags": "im"},
        {"type": "contains_none", "strings": ["sorry"]},
        {"type": "word_count", "max": 10, "name": "short"},
        {"type": "valid_json", "required_keys": ["x"], "name": "json"},
        {"type": "ends_with_number"},
    ], mode="all")
    ev = rules.evaluate("intro\nANSWER: 7")
    assert {k: ok for k, (ok, _) in ev["results"].items()} == {
        "regex:^answer:": True, "contains_none": True, "short": True, "json": False, "ends_with_number": True}
    assert ev["score"] == pytest.approx(0.8) and ev["passed"] is False


@pytest.mark.parametrize(("spec", "message"), [
    ({"type": "nope"}, "unknown rule type 'nope'"),
    ({"type": "regex"}, "field 'pattern' is required"),
    ({"type": "regex", "pattern": "("}, "not a valid regular expression"),
    ({"type": "regex", "pattern": "a", "flags": "q"}, "unknown flag 'q'"),
    ({"type": "contains_all", "strings": "abc"}, "list of strings"),
    ({"type": "word_count", "max": "10"}, "'max' must be an integer"),
    ({"type": "char_length"}, "give a minimum"),
    ({"type": "ends_with_number", "extra": 1}, "unknown field"),
    ("regex", "must be a mapping"),
])
def test_bad_specs_name_the_problem(spec, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        rule_from_spec(spec)
    with pytest.raises(ValueError, match=r"rules\[1\]"):
        ruleset_from_spec([{"type": "ends_with_number"}, spec])


def test_rule_verifier_reads_prompt_meta() -> None:
    prompt = Prompt(id="p", prompt="Give a number", meta={
        "rules": [{"type": "ends_with_number"}, {"type": "char_length", "max": 5}], "rules_mode": "any"})
    j = rule_verifier(prompt, cand("it is twelve, or 12"))
    assert j.status == "ok" and j.judge == "rule_verifier"
    assert j.scores == {"rule:ends_with_number": 1.0, "rule:char_length": 0.0, "score": 0.5, "passed": 1.0}
    missing = rule_verifier(Prompt(id="p", prompt="x"), cand("x"))
    assert missing.status == "error" and "non-empty list" in missing.reason and not missing.scores
    bad = rule_verifier(Prompt(id="p", prompt="x", meta={"rules": [{"type": "regex", "pattern": "("}]}), cand("x"))
    assert bad.status == "error" and "rules[0]" in bad.reason
