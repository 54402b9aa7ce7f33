"""Position-bias control (both orders) and the cross-family guard, on a fake deterministic judge backend."""

from __future__ import annotations

import json
import re

import pytest

from alignpipe import AlignpipeError
from alignpipe.evaluation.base import PairwiseJudge
from alignpipe.evaluation.bias import (
    BothOrdersJudge,
    SelfPreferenceError,
    check_cross_family,
    consistency_rate,
    model_family,
)
from alignpipe.evaluation.llm_judge import PairwiseLLMJudge
from alignpipe.records import Candidate, Prompt


class OrderBackend:
    """A fake judge that decides from the texts it is shown: `rule(a_text, b_text) -> judge answer`."""

    name = "fake-judge"

    def __init__(self, rule):
        self.rule = rule
        self.calls = 0

    def complete(self, conversations, max_new_tokens=256, temperature=0.0):
        self.calls += 1
        out = []
        for conv in conversations:
            user = conv[-1]["content"]
            a = re.search(r"<response_a>\n(.*?)\n</response_a>", user, re.S).group(1)
            b = re.search(r"<response_b>\n(.*?)\n</response_b>", user, re.S).group(1)
            out.append(self.rule(a, b))
        return out


P = Prompt(id="p", prompt="Name a colour.")
GOOD, BAD = Candidate("p", "good", "Blue."), Candidate("p", "bad", "Seven.")


def judge(rule, policy="tie", **kw):
    return BothOrdersJudge(PairwiseLLMJudge(OrderBackend(rule), **kw), on_inconsistent=policy)


def prefers_good(a, b):
    return "Verdict: A" if a == "Blue." else "Verdict: B"


def always_a(a, b):  # pure position bias
    return "Verdict: A"


def test_consistent_pair_keeps_verdict_in_original_order():
    j = judge(prefers_good)
    assert isinstance(j, PairwiseJudge)
    r1, r2 = j.compare([(P, GOOD, BAD), (P, BAD, GOOD)])
    assert (r1.status, r1.preference, r1.candidate_ids) == ("ok", "first", ["good", "bad"])
    assert (r2.status, r2.preference, r2.candidate_ids) == ("ok", "second", ["bad", "good"])
    raw = json.loads(r1.raw)
    assert raw["consistent"] is True and raw["ab"]["preference"] == "first"
    assert raw["ba"]["preference"] == "second" and raw["ba"]["mapped"] == "first"
    assert json.loads(raw["ab"]["raw"])["attempts"] == ["Verdict: A"]
    assert j.stats["consistent"] == 2 and j.consistency == 1.0
    assert j.inner.backend.calls == 1  # both orders go in one batched call


def test_consistent_tie():
    [r] = judge(lambda a, b: "Verdict: tie").compare([(P, GOOD, BAD)])
    assert (r.status, r.preference, json.loads(r.raw)["consistent"]) == ("ok", "tie", True)


@pytest.mark.parametrize("policy,status,preference,reason", [
    ("tie", "ok", "tie", "inconsistent (resolved: tie)"),
    ("first", "ok", "first", "inconsistent (resolved: first)"),
    ("drop", "invalid", None, "inconsistent"),
])
def test_inconsistent_pair_policies(policy, status, preference, reason):
    j = judge(always_a, policy)
    [r] = j.compare([(P, GOOD, BAD)])
    assert (r.status, r.preference, r.reason) == (status, preference, reason)
    raw = json.loads(r.raw)
    assert raw["consistent"] is False and raw["policy"] == policy
    assert (raw["ab"]["preference"], raw["ba"]["preference"], raw["ba"]["mapped"]) == ("first", "first", "second")
    assert j.stats["inconsistent"] == 1 and j.consistency == 0.0


def test_first_policy_uses_original_order_verdict():
    [r] = judge(always_a, "first").compare([(P, BAD, GOOD)])
    assert r.preference == "first" and r.candidate_ids == ["bad", "good"]


def test_tie_against_win_is_inconsistent():
    rule = lambda a, b: "Verdict: A" if a == "Blue." else "Verdict: tie"  # noqa: E731
    [r] = judge(rule, "drop").compare([(P, GOOD, BAD)])
    assert r.status == "invalid" and r.reason == "inconsistent"


def test_one_order_unparseable_makes_pair_invalid_with_both_raws():
    rule = lambda a, b: "Verdict: A" if a == "Blue." else "no idea"  # noqa: E731
    j = judge(rule, parse_retries=1)
    [r] = j.compare([(P, GOOD, BAD)])
    assert r.status == "invalid" and r.preference is None and r.reason.startswith("order ba: invalid")
    raw = json.loads(r.raw)
    assert raw["consistent"] is None
    assert json.loads(raw["ba"]["raw"])["attempts"] == ["no idea", "no idea"]
    assert j.stats["undecided"] == 1 and j.consistency is None


def test_consistency_rate_over_judgments_on_disk(tmp_path):
    from alignpipe.records import Judgment, read_records, write_records

    j = judge(lambda a, b: "Verdict: A" if len(a) < 6 else "Verdict: B")  # prefers the shorter, both orders
    out = j.compare([(P, GOOD, BAD)]) + judge(always_a).compare([(P, GOOD, BAD), (P, BAD, GOOD)])
    write_records(tmp_path / "j.parquet", out)
    back = read_records(tmp_path / "j.parquet", Judgment)
    assert consistency_rate(back) == pytest.approx(1 / 3)
    assert consistency_rate([]) is None


def test_bad_policy_rejected():
    with pytest.raises(ValueError, match="on_inconsistent"):
        judge(always_a, "coin")


@pytest.mark.parametrize("name,family", [
    ("smollm2-135m-instruct", "smollm"), ("HuggingFaceTB/SmolLM2-360M-Instruct", "smollm"),
    ("/root/.cache/alignpipe/smollm2-135m-instruct/", "smollm"), ("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm"),
    ("meta-llama/Llama-3.1-8B-Instruct", "llama"), ("Meta-Llama-3-8B-Instruct.Q4_K_M.gguf", "llama"),
    ("codellama-7b", "llama"), ("Qwen/Qwen2.5-7B-Instruct", "qwen"), ("qwen3-0.6b", "qwen"), ("QwQ-32B", "qwen"),
    ("mistralai/Mixtral-8x7B", "mistral"), ("gpt-4o-mini", "gpt"), ("google/gemma-2-2b-it", "gemma"),
])
def test_model_family(name, family):
    assert model_family(name) == family


def test_check_cross_family():
    assert check_cross_family("Qwen2.5-7B-Instruct", "smollm2-135m-instruct") == ("qwen", "smollm")
    with pytest.raises(SelfPreferenceError, match="both of model family 'smollm'") as info:
        check_cross_family("HuggingFaceTB/SmolLM2-1.7B-Instruct", "/models/smollm2-135m-instruct")
    assert isinstance(info.value, AlignpipeError)
    assert check_cross_family("smollm2-1.7b", "smollm2-135m", required=False) == ("smollm", "smollm")
