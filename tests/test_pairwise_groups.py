"""Pairwise judges over k candidates: the comparison plan, both orders, win rate / Bradley-Terry, failures."""

from __future__ import annotations

import math
from itertools import combinations

import pytest

from alignpipe.evaluation.pairwise_groups import (
    BT_L2,
    comparison_plan,
    default_budget,
    judge_groups,
    pairwise_stats,
)
from alignpipe.records import Candidate, Judgment, Prompt, read_records, write_records


class ScriptedJudge:
    """A fake pairwise judge: `rule(prompt, first, second) -> (status, preference)`; counts its calls."""

    name = "scripted"

    def __init__(self, rule):
        self.rule = rule
        self.calls = 0
        self.seen: list[tuple[str, str]] = []

    def compare(self, items):
        self.calls += 1
        out = []
        for prompt, a, b in items:
            self.seen.append((a.id, b.id))
            status, pref = self.rule(prompt, a, b)
            out.append(Judgment(prompt.id, [a.id, b.id], self.name, preference=pref if status == "ok" else None,
                                status=status, reason="" if status == "ok" else f"scripted {status}"))
        return out


def by_quality(quality):
    """Prefers the higher hidden quality; equal quality is a tie."""
    def rule(prompt, a, b):
        qa, qb = quality[a.id], quality[b.id]
        return "ok", "first" if qa > qb else "second" if qb > qa else "tie"
    return rule


def longer(prompt, a, b):
    la, lb = len(a.completion), len(b.completion)
    return "ok", "first" if la > lb else "second" if lb > la else "tie"


def always_first(prompt, a, b):  # pure position bias
    return "ok", "first"


def group(pid, texts):
    return Prompt(id=pid, prompt="q"), [Candidate(pid, f"{pid}-{n}", t) for n, t in enumerate(texts)]


def counts(k, plan):
    c = [0] * k
    for i, j in plan:
        c[i] += 1
        c[j] += 1
    return c


def connected(k, plan):
    parent = list(range(k))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for i, j in plan:
        parent[find(i)] = find(j)
    return len({find(i) for i in range(k)}) <= 1


# ---------------------------------------------------------------- plan

def test_plan_all_pairs_without_or_within_budget():
    for k in range(2, 17):
        total = k * (k - 1) // 2
        assert comparison_plan(k) == list(combinations(range(k), 2))
        assert comparison_plan(k, total, seed=3) == list(combinations(range(k), 2))
        assert comparison_plan(k, total + 5) == list(combinations(range(k), 2))
    assert comparison_plan(1) == [] and comparison_plan(0) == []


def test_plan_budget_is_balanced_connected_without_duplicates():
    for k in range(2, 17):
        for budget in range(k * (k - 1) // 2):
            for seed in range(2):
                plan = comparison_plan(k, budget, seed)
                assert len(plan) == budget and len(set(plan)) == budget
                assert all(0 <= i < j < k for i, j in plan)
                c = counts(k, plan)
                # every candidate plays floor(2B/k) or ceil(2B/k) times
                assert set(c) <= {2 * budget // k, -(-2 * budget // k)}, (k, budget, seed, c)
                if budget >= k - 1:
                    assert connected(k, plan), (k, budget, seed)


def test_plan_is_seeded():
    assert comparison_plan(10, 20, seed=1) == comparison_plan(10, 20, seed=1)
    assert comparison_plan(10, 20, seed=1) != comparison_plan(10, 20, seed=2)
    assert sorted(counts(10, comparison_plan(10, 20, seed=5))) == [4] * 10
    with pytest.raises(ValueError):
        comparison_plan(4, -1)


def test_default_budget():
    assert [default_budget(k) for k in (2, 3, 8, 9, 16)] == [1, 3, 28, 36, 64]


# ---------------------------------------------------------------- win rate

def test_win_rates_by_hand_for_three_and_raw_keeps_both_orders():
    prompt, cands = group("p", ["x", "xx", "yy"])  # p-0 loses to both, p-1 and p-2 tie
    judge = ScriptedJudge(longer)
    scored, raw = judge_groups(judge, [(prompt, cands)])
    # p-0: 0 of 4; p-1: 2 wins + 2 ties of 4 = 3/4; p-2 the same
    assert [j.candidate_ids for j in scored] == [["p-0"], ["p-1"], ["p-2"]]
    assert [j.scores for j in scored] == [{"win_rate": 0.0}, {"win_rate": 0.75}, {"win_rate": 0.75}]
    assert all(j.status == "ok" and j.judge == "scripted" for j in scored)
    assert [j.candidate_ids for j in raw] == [["p-0", "p-1"], ["p-1", "p-0"], ["p-0", "p-2"], ["p-2", "p-0"],
                                              ["p-1", "p-2"], ["p-2", "p-1"]]
    assert [j.preference for j in raw] == ["second", "first", "second", "first", "tie", "tie"]
    assert pairwise_stats(raw) == {"comparisons": 6, "invalid_rate": 0.0, "error_rate": 0.0,
                                   "both_order_consistency": 1.0}


def test_position_biased_judge_gives_one_half_and_zero_consistency():
    prompt, cands = group("p", ["a", "bb", "ccc", "dddd"])
    for aggregate, value in (("win_rate", 0.5), ("bradley_terry", 0.0)):
        scored, raw = judge_groups(ScriptedJudge(always_first), [(prompt, cands)], aggregate=aggregate)
        assert [j.scores[aggregate] for j in scored] == pytest.approx([value] * 4, abs=1e-12)
        assert len(raw) == 12
        assert pairwise_stats(raw)["both_order_consistency"] == 0.0


# ---------------------------------------------------------------- Bradley-Terry

def test_bt_two_candidates_solves_the_map_equation():
    prompt, cands = group("p", ["long answer", "short"])
    scored, _ = judge_groups(ScriptedJudge(longer), [(prompt, cands)], aggregate="bradley_terry")
    t, u = scored[0].scores["bradley_terry"], scored[1].scores["bradley_terry"]
    # two half-games won by p-0: the MAP point t = -u solves l2 * t = sigmoid(-2t)
    assert u == pytest.approx(-t, abs=1e-12) and t > 0
    assert BT_L2 * t == pytest.approx(1 / (1 + math.exp(2 * t)), abs=1e-10)


def hamiltonian_path(k, plan):
    adj = {i: set() for i in range(k)}
    for i, j in plan:
        adj[i].add(j)
        adj[j].add(i)

    def extend(path):
        if len(path) == k:
            return path
        for nxt in sorted(adj[path[-1]] - set(path)):
            found = extend(path + [nxt])
            if found:
                return found
        return None

    return next(p for s in range(k) if (p := extend([s])))


def test_bt_ranks_hidden_order_from_incomplete_round_robin():
    k, budget, seed = 10, 20, 0
    plan = comparison_plan(k, budget, seed)
    # hidden quality rises along a path of planned pairs, so the verdicts determine the whole order
    path = hamiltonian_path(k, plan)
    prompt, cands = group("p", [f"c{i}" for i in range(k)])
    quality = {cands[c].id: rank for rank, c in enumerate(path)}
    judge = ScriptedJudge(by_quality(quality))
    bt, raw = judge_groups(judge, [(prompt, cands)], max_comparisons=budget, aggregate="bradley_terry", seed=seed)
    assert judge.calls == 1 and len(raw) == 2 * budget
    strengths = [bt[c].scores["bradley_terry"] for c in path]
    assert strengths == sorted(strengths) and len(set(strengths)) == k  # exactly the hidden order
    assert sum(strengths) == pytest.approx(0.0, abs=1e-9)
    wr, _ = judge_groups(ScriptedJudge(by_quality(quality)), [(prompt, cands)], max_comparisons=budget, seed=seed)
    win_rates = [wr[c].scores["win_rate"] for c in path]
    assert win_rates != sorted(win_rates) or len(set(win_rates)) < k  # win rate cannot tell them apart


# ---------------------------------------------------------------- failures

def test_not_ok_verdicts_are_skipped():
    prompt, cands = group("p", ["A", "B", "C"])
    script = {("p-0", "p-1"): ("ok", "first"), ("p-1", "p-0"): ("ok", "second"),  # A beats B twice
              ("p-0", "p-2"): ("error", None), ("p-2", "p-0"): ("ok", "first"),  # C beats A once
              ("p-1", "p-2"): ("invalid", None), ("p-2", "p-1"): ("invalid", None)}
    scored, raw = judge_groups(ScriptedJudge(lambda p, a, b: script[(a.id, b.id)]), [(prompt, cands)])
    assert [j.scores for j in scored] == [{"win_rate": 2 / 3}, {"win_rate": 0.0}, {"win_rate": 1.0}]
    assert pairwise_stats(raw) == {"comparisons": 6, "invalid_rate": 2 / 6, "error_rate": 1 / 6,
                                   "both_order_consistency": 1.0}


def test_candidate_without_ok_verdict_gets_no_scores():
    prompt, cands = group("p", ["A", "B", "C", "D"])

    def rule(p, a, b):
        pair = {a.id, b.id}
        if pair == {"p-0", "p-1"}:
            return "ok", "first" if a.id == "p-0" else "second"  # A beats B in both orders
        if (a.id, b.id) == ("p-0", "p-3"):
            return "invalid", None
        return "error", None  # everything else about C and D fails

    for aggregate in ("win_rate", "bradley_terry"):
        scored, _ = judge_groups(ScriptedJudge(rule), [(prompt, cands)], aggregate=aggregate)
        assert [j.status for j in scored] == ["ok", "ok", "error", "invalid"]
        assert [j.reason for j in scored[2:]] == ["no ok comparison (6 error, 0 invalid)",
                                                  "no ok comparison (5 error, 1 invalid)"]
        assert scored[2].scores == {} and scored[3].scores == {}
        a, b = scored[0].scores[aggregate], scored[1].scores[aggregate]
        if aggregate == "win_rate":
            assert (a, b) == (1.0, 0.0)
        else:  # centred over the rated candidates only
            assert a > 0 and b == pytest.approx(-a, abs=1e-12)


def test_single_candidate_is_alone():
    prompt, cands = group("solo", ["only"])
    judge = ScriptedJudge(longer)
    scored, raw = judge_groups(judge, [(prompt, cands)])
    assert raw == [] and judge.calls == 0
    assert (scored[0].status, scored[0].reason, scored[0].scores) == ("invalid", "alone: nothing to compare", {})


# ---------------------------------------------------------------- batching and storage

def test_one_batched_call_for_all_groups_and_raw_round_trips(tmp_path):
    groups = [group("a", ["1", "22", "333"]), group("b", ["1", "22", "333", "4444"]), group("c", ["x"])]
    judge = ScriptedJudge(longer)
    scored, raw = judge_groups(judge, groups)
    assert judge.calls == 1 and len(judge.seen) == 2 * (3 + 6) == len(raw)
    assert [j.candidate_ids[0] for j in scored] == [c.id for _, cands in groups for c in cands]
    assert [j.scores.get("win_rate") for j in scored] == [0.0, 0.5, 1.0, 0.0, 1 / 3, 2 / 3, 1.0, None]
    ordered = {tuple(j.candidate_ids) for j in raw}
    assert all((b, a) in ordered for a, b in ordered)  # both orders of every pair
    write_records(tmp_path / "judgments.parquet", raw)
    assert pairwise_stats(read_records(tmp_path / "judgments.parquet", Judgment)) == pairwise_stats(raw)


def test_bad_arguments_and_short_answers():
    prompt, cands = group("p", ["a", "b"])
    with pytest.raises(ValueError):
        judge_groups(ScriptedJudge(longer), [(prompt, cands)], aggregate="elo")

    class Short(ScriptedJudge):
        def compare(self, items):
            return super().compare(items)[:-1]

    with pytest.raises(RuntimeError):
        judge_groups(Short(longer), [(prompt, cands)])


def test_one_order_per_pair_when_both_orders_is_off():
    prompt = Prompt(id="p", prompt="q")
    cands = [Candidate("p", f"p/{i}", "x" * (i + 1)) for i in range(4)]

    class Longer:
        name = "longer-pairwise"
        calls: list[int] = []

        def compare(self, items):
            self.calls.append(len(items))
            return [Judgment(p.id, [a.id, b.id], self.name,
                             preference="first" if len(a.completion) > len(b.completion) else "second")
                    for p, a, b in items]

    judge = Longer()
    per, raw = judge_groups(judge, [(prompt, cands)], both_orders=False, seed=3)
    assert judge.calls == [6] and len(raw) == 6  # 4 choose 2 pairs, one order each
    assert {frozenset(j.candidate_ids) for j in raw} == {frozenset((a.id, b.id)) for a, b in combinations(cands, 2)}
    assert [j.scores["win_rate"] for j in per] == [0.0, 1 / 3, 2 / 3, 1.0]
    again = judge_groups(judge, [(prompt, cands)], both_orders=False, seed=3)[1]
    assert [j.candidate_ids for j in again] == [j.candidate_ids for j in raw]  # the orientation is seeded
