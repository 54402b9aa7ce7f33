"""Selection rules (instantiation/selection.py) on hand-made margins, scores and verdicts; the implicit-margin
helper once on the tiny model against a plain log-prob computation."""

from __future__ import annotations

import math

import pytest

from alignpipe import AlignpipeError
from alignpipe.evaluation.ensemble import MeanEnsemble, VoteEnsemble
from alignpipe.instantiation.selection import (
    SELECTION_RULES,
    PairLogps,
    dynamic_fill,
    ensemble_margin_variance,
    implicit_margin_select,
    judge_disagreement,
    policy_entropy,
    random_select,
    score_margin_select,
    select,
    tied_prompts,
    uncertainty_select,
)
from alignpipe.records import Candidate, GroupExample, Judgment, PairExample, PointExample, Prompt


def pairs(margins, prompt_ids=None):
    prompt_ids = prompt_ids or [f"p{i}" for i in range(len(margins))]
    return [PairExample(prompt="q", chosen=f"c{i}", rejected=f"r{i}", margin=m, prompt_id=pid)
            for i, (m, pid) in enumerate(zip(margins, prompt_ids, strict=True))]


def chosen(kept):
    return [e.chosen for e in kept]


def test_registry_and_select_errors():
    assert set(SELECTION_RULES) == {"random", "score_margin", "implicit_margin", "uncertainty"}
    with pytest.raises(AlignpipeError, match="unknown selection rule 'best'"):
        select("best", pairs([1.0]), 1)
    with pytest.raises(AlignpipeError, match="has no parameter etta"):
        select("score_margin", pairs([1.0]), 1, etta=0.9)
    with pytest.raises(AlignpipeError, match="budget"):
        select("score_margin", pairs([1.0]), -1)
    with pytest.raises(AlignpipeError, match="'implicit_margin' needs logps"):
        select("implicit_margin", pairs([1.0]), 1)
    assert select("random", [], 3) == ([], {"rule": "random", "considered": 0, "kept": 0, "mean_margin": None,
                                            "mean_key": None, "dropped": {}})


def test_score_margin_rs_dpo_threshold_then_budget():
    exs = pairs([0.5, 2.0, 1.0, 3.0, 1.8])
    kept, stats = score_margin_select(exs, 2, eta=0.85)  # gap > logit(0.85) = 1.7346: 2.0, 3.0, 1.8 pass
    assert chosen(kept) == ["c1", "c3"]  # the two largest, in original order
    assert stats["considered"] == 5 and stats["kept"] == 2 and stats["mean_margin"] == pytest.approx(2.5)
    assert stats["dropped"] == {"below_threshold": 2, "over_budget": 1}
    kept, stats = select("score_margin", exs, None, min_margin=1.0)
    assert chosen(kept) == ["c1", "c2", "c3", "c4"] and stats["mean_margin"] == pytest.approx(1.95)
    assert stats["dropped"] == {"below_threshold": 1}
    kept, _ = score_margin_select(exs, 3)  # no threshold: the budget alone
    assert chosen(kept) == ["c1", "c3", "c4"]


def test_score_margin_ties_keep_order_and_groups_and_points():
    kept, _ = score_margin_select(pairs([1.0, 1.0, 1.0]), 2)
    assert chosen(kept) == ["c0", "c1"]
    groups = [GroupExample(prompt="q", completions=["a", "b"], scores=s, prompt_id=str(i))
              for i, s in enumerate([[0.0, 0.2], [1.0, 0.0], [0.5, 0.5]])]
    kept, stats = score_margin_select(groups, 1)
    assert [g.prompt_id for g in kept] == ["1"] and stats["mean_margin"] == 1.0
    with pytest.raises(AlignpipeError, match="example 0 is a PointExample"):
        score_margin_select([PointExample(prompt="q", completion="a", score=1.0, label=True)], 1)


def test_budget_in_prompts_keeps_all_pairs_of_the_best_prompts():
    exs = pairs([1.0, 0.2, 3.0, 2.0, 2.5], ["a", "a", "b", "c", "c"])
    kept, stats = score_margin_select(exs, 2, unit="prompt")  # best per prompt: a 1.0, b 3.0, c 2.5
    assert chosen(kept) == ["c2", "c3", "c4"] and stats["kept"] == 3
    assert stats["dropped"] == {"over_budget": 2}
    with pytest.raises(AlignpipeError, match="unit"):
        score_margin_select(exs, 2, unit="prompts")


def test_random_is_seeded_and_respects_budget():
    exs = pairs([float(i) for i in range(10)])
    a, stats = random_select(exs, 3, seed=1)
    assert len(a) == 3 and stats["kept"] == 3 and stats["dropped"] == {"over_budget": 7}
    assert chosen(random_select(exs, 3, seed=1)[0]) == chosen(a)
    assert len({tuple(chosen(random_select(exs, 3, seed=s)[0])) for s in range(6)}) > 1
    assert chosen(random_select(exs, None)[0]) == chosen(exs)
    by_prompt = pairs([1.0] * 6, ["a", "a", "b", "b", "c", "c"])
    kept, _ = random_select(by_prompt, 2, seed=0, unit="prompt")
    assert len(kept) == 4 and len({e.prompt_id for e in kept}) == 2  # whole prompts


# policy / reference log-prob sums: lr_w = [0, -2, 2], lr_l = [-1, 1, -10] -> h = [1, -3, 12]
LOGPS = PairLogps(chosen=[-10.0, -12.0, -8.0], rejected=[-11.0, -9.0, -20.0], ref_chosen=[-10.0] * 3,
                  ref_rejected=[-10.0] * 3)


def test_implicit_margin_highest_lowest_potential():
    exs = pairs([3.0, 1.0, 2.0])
    kept, stats = implicit_margin_select(exs, 1, logps=LOGPS, beta=0.1)
    assert chosen(kept) == ["c2"] and stats["mean_key"] == pytest.approx(1.2)
    assert stats["implicit_margins"] == pytest.approx([0.1, -0.3, 1.2])
    assert stats["mean_margin"] == 2.0  # the explicit (judged) margin of the kept pair
    kept, stats = implicit_margin_select(exs, 1, logps=lambda e: LOGPS, beta=0.1, keep="lowest")
    assert chosen(kept) == ["c1"] and stats["mean_key"] == pytest.approx(-0.3)
    # M_AP = z(explicit) - z(implicit) = [1.59, -0.23, -1.37]: a big judged gap the policy has not learnt
    kept, _ = select("implicit_margin", exs, 1, logps=LOGPS, keep="potential")
    assert chosen(kept) == ["c0"]
    with pytest.raises(AlignpipeError, match="3 log-prob rows for 2 pairs"):
        implicit_margin_select(exs[:2], 1, logps=LOGPS)
    with pytest.raises(AlignpipeError, match="needs pairs"):
        implicit_margin_select([PointExample(prompt="q", completion="a", score=1.0, label=True)], 1, logps=LOGPS)


def test_uncertainty_keep_least_most_and_measure_defaults():
    exs = pairs([1.0, 1.0, 1.0, 1.0])
    values = [0.2, math.nan, 0.9, 0.5]
    kept, stats = uncertainty_select(exs, 2, values=values, keep="least")
    assert chosen(kept) == ["c0", "c3"] and stats["mean_key"] == pytest.approx(0.35)
    assert stats["dropped"] == {"no_value": 1, "over_budget": 1} and stats["keep"] == "least"
    kept, _ = select("uncertainty", exs, 1, values=values, measure="entropy")  # APL: most uncertain
    assert chosen(kept) == ["c2"]
    kept, _ = select("uncertainty", exs, 1, values=values, measure="ensemble_variance")
    assert chosen(kept) == ["c0"]
    kept, _ = uncertainty_select(exs, 1, values=lambda e: float(e.chosen[1:]), keep="most")
    assert chosen(kept) == ["c3"]
    with pytest.raises(AlignpipeError, match="give keep"):
        uncertainty_select(exs, 1, values=values)


# ---------------------------------------------------------------- uncertainty inputs from judgments


def _verdict(pid, a, b, pref, judge="j"):
    return Judgment(prompt_id=pid, candidate_ids=[a, b], judge=judge, preference=pref)


class Fixed:
    """A fake judge answering from a table: pointwise scores or pairwise preferences by candidate ids."""

    def __init__(self, name, table):
        self.name, self.table = name, table

    def score(self, items):
        return [Judgment(p.id, [c.id], self.name, scores={"s": self.table[c.id]}) for p, c in items]

    def compare(self, items):
        return [_verdict(p.id, a.id, b.id, self.table[(a.id, b.id)], self.name) for p, a, b in items]


def test_judge_disagreement_over_both_orders_and_vote_members():
    cands = [Candidate("p", "p/0", "A"), Candidate("p", "p/1", "B"), Candidate("p", "p/2", "C"),
             Candidate("q", "q/0", "X"), Candidate("q", "q/1", "Y")]
    raw = [_verdict("p", "p/0", "p/1", "first"), _verdict("p", "p/1", "p/0", "second"),  # A over B both ways
           _verdict("p", "p/0", "p/2", "first"), _verdict("p", "p/2", "p/0", "first")]  # position bias
    prompt = Prompt("q", "q?")
    members = [Fixed(f"m{k}", {("q/0", "q/1"): v}) for k, v in enumerate(["first", "first", "second"])]
    vote = VoteEnsemble(members).compare([(prompt, cands[3], cands[4])])
    exs = [PairExample("", "A", "B", 1.0, prompt_id="p"), PairExample("", "A", "C", 1.0, prompt_id="p"),
           PairExample("", "X", "Y", 1.0, prompt_id="q"), PairExample("", "B", "C", 1.0, prompt_id="p")]
    got = judge_disagreement(exs, cands, raw + vote)
    assert got[:3] == pytest.approx([0.0, 1.0, 2 / 3])  # members 1, 1, 0: |1-1|, |1-0|, |1-0| over 3 pairs
    assert math.isnan(got[3])  # B and C were never compared


def test_ensemble_margin_variance_from_mean_ensemble_members():
    cands = [Candidate("p", "p/0", "good"), Candidate("p", "p/1", "bad")]
    tables = [{"p/0": 1.0, "p/1": 0.0}, {"p/0": 0.8, "p/1": 0.2}, {"p/0": 0.6, "p/1": 0.6}]
    prompt = Prompt("p", "p?")
    judgments = MeanEnsemble([Fixed(f"m{k}", t) for k, t in enumerate(tables)]).score(
        [(prompt, c) for c in cands])
    exs = [PairExample("", "good", "bad", 0.53, prompt_id="p"), PairExample("", "good", "gone", 1.0, prompt_id="p")]
    got = ensemble_margin_variance(exs, cands, judgments)
    assert got[0] == pytest.approx(0.168889, abs=1e-6)  # Var([1.0, 0.6, 0.0])
    assert math.isnan(got[1])  # "gone" has no judgment


def test_policy_entropy_mean_over_completions():
    cands = [Candidate("p", "p/0", "a"), Candidate("p", "p/1", "b"), Candidate("p", "p/2", "c")]
    entropy = {"p/0": 1.0, "p/1": 3.0, "p/2": 2.0}
    exs = [PairExample("", "a", "b", 1.0, prompt_id="p"),
           GroupExample("", ["a", "b", "c"], [1.0, 0.0, 0.5], prompt_id="p"),
           PointExample("", "c", 0.5, True, prompt_id="p"), PointExample("", "zzz", 0.5, True, prompt_id="p")]
    got = policy_entropy(exs, cands, entropy)
    assert got[:3] == [2.0, 2.0, 2.0] and math.isnan(got[3])


# ---------------------------------------------------------------- DAPO dynamic sampling


def test_tied_prompts():
    groups = {"a": [1.0, 0.0], "b": [1.0, 1.0], "c": [0.5], "d": [0.5, 0.52]}
    assert tied_prompts(groups) == ["b", "c"]
    assert tied_prompts(groups, tol=0.05) == ["b", "c", "d"]


class Scripted:
    """A fake sampler: each call returns the next scripted batch of judged fresh prompts."""

    def __init__(self, batches):
        self.batches, self.asked = list(batches), []

    def __call__(self, n):
        self.asked.append(n)
        return self.batches.pop(0) if self.batches else {}


INITIAL = {"a": [1.0, 0.0], "b": [1.0, 1.0], "c": [0.0, 0.0], "d": [0.0, 1.0, 1.0]}


def test_dynamic_fill_replaces_tied_prompts_until_full():
    sampler = Scripted([{"e": [0.0, 0.0], "f": [1.0, 0.0]}, {"g": [1.0, 1.0]}, {"h": [0.0, 1.0], "i": [1.0, 0.0]}])
    kept, stats = dynamic_fill(INITIAL, 4, sampler, max_attempts=5)
    assert kept == ["a", "d", "f", "h"] and sampler.asked == [2, 1, 1]
    assert stats == {"attempts": 3, "requested": 4, "sampled": 5, "replaced": 4, "surplus": 1, "final": 4,
                     "target": 4, "full": True, "stop": "full"}


def test_dynamic_fill_stops_at_caps():
    kept, stats = dynamic_fill(INITIAL, 4, Scripted([{"f": [1.0, 0.0]}]), max_attempts=5)
    assert kept == ["a", "d", "f"] and stats["stop"] == "pool_empty" and not stats["full"]
    assert stats["attempts"] == 2 and stats["final"] == 3  # the second call found the pool empty
    kept, stats = dynamic_fill(INITIAL, 4, Scripted([{"e": [0.0, 0.0], "f": [1.0, 0.0]}]), max_attempts=1)
    assert kept == ["a", "d", "f"] and stats["stop"] == "max_attempts" and stats["replaced"] == 3
    sampler = Scripted([{"e": [0.0, 0.0], "f": [1.0, 0.0]}, {"h": [0.0, 1.0]}])
    kept, stats = dynamic_fill(INITIAL, 4, sampler, max_new_prompts=2, oversample=1.5)
    assert sampler.asked == [2] and stats["stop"] == "max_new_prompts"  # ceil(2 * 1.5) = 3, capped at 2
    kept, stats = dynamic_fill(INITIAL, 2)
    assert kept == ["a", "d"] and stats["stop"] == "full" and stats["attempts"] == 0
    assert dynamic_fill(INITIAL, 3)[1]["stop"] == "no_sampler"
    # a prompt id the round already has is no fresh prompt
    kept, stats = dynamic_fill(INITIAL, 3, Scripted([{"a": [0.0, 1.0]}]), max_attempts=3)
    assert kept == ["a", "d"] and stats["stop"] == "pool_empty" and stats["sampled"] == 0
    with pytest.raises(AlignpipeError, match="oversample"):
        dynamic_fill(INITIAL, 3, oversample=0.5)


# ---------------------------------------------------------------- the implicit margin on the tiny model


@pytest.mark.usefixtures("one_thread")
def test_pair_logps_equals_plain_logprob_computation(tiny_model_path, tok):
    import torch
    from tiny import MAX_LENGTH, arithmetic_pairs, encode_rows, lora, perturb

    from alignpipe.config import OptimizationConfig
    from alignpipe.instantiation.selection import pair_logps
    from alignpipe.optimization.logprobs import sequence_logps

    model = lora(tiny_model_path)
    examples = arithmetic_pairs(tok)[:4]
    cfg = OptimizationConfig(max_length=MAX_LENGTH, precision="fp32")
    fresh = pair_logps(model, tok, examples, cfg)
    assert fresh.margins(0.1) == pytest.approx([0.0] * 4, abs=1e-6)  # LoRA B = 0: policy == reference
    perturb(model, seed=3)
    lp = pair_logps(model, tok, examples, cfg)

    def plain(text_of):
        batch = encode_rows(tok, [(e.prompt, text_of(e)) for e in examples])
        with torch.no_grad():
            return sequence_logps(model.eval(), **batch).logps.tolist()

    expected = {"chosen": plain(lambda e: e.chosen), "rejected": plain(lambda e: e.rejected)}
    with model.disable_adapter():
        expected["ref_chosen"] = plain(lambda e: e.chosen)
        expected["ref_rejected"] = plain(lambda e: e.rejected)
    for name, values in expected.items():
        assert list(getattr(lp, name)) == pytest.approx(values, abs=1e-4), name
    margins = lp.margins(0.1)
    assert max(abs(m) for m in margins) > 1e-3  # the perturbed policy differs from its reference
    kept, stats = implicit_margin_select(examples, 1, logps=lp)
    assert stats["implicit_margins"] == pytest.approx(list(margins))
    assert kept == [examples[int(margins.argmax())]]
