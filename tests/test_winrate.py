"""Held-out win rate (diagnostics/winrate.py) with scripted judges and exact expected answers."""

from __future__ import annotations

import math

import pytest

from alignpipe.diagnostics.winrate import heldout_winrate, mean_ci95
from alignpipe.records import Candidate, Judgment, Prompt


class LongerJudge:
    """Pairwise: prefers the longer completion, tie on equal length. Records every call."""

    name = "longer"

    def __init__(self, status: dict[tuple[str, int], str] | None = None) -> None:
        self.calls: list[list] = []
        self.status = status or {}  # (prompt id, order index 0/1) -> non-ok status

    def compare(self, items: list[tuple[Prompt, Candidate, Candidate]]) -> list[Judgment]:
        self.calls.append(items)
        seen: dict[str, int] = {}
        out = []
        for p, a, b in items:
            order = seen.get(p.id, 0)
            seen[p.id] = order + 1
            status = self.status.get((p.id, order), "ok")
            la, lb = len(a.completion), len(b.completion)
            pref = "first" if la > lb else "second" if la < lb else "tie"
            out.append(Judgment(p.id, [a.id, b.id], self.name, preference=pref if status == "ok" else None,
                                status=status))
        return out


class FirstJudge:
    name = "first"

    def compare(self, items: list[tuple[Prompt, Candidate, Candidate]]) -> list[Judgment]:
        return [Judgment(p.id, [a.id, b.id], self.name, preference="first") for p, a, b in items]


class TableScorer:
    """Pointwise: scores looked up by candidate id (missing id = invalid judgment)."""

    name = "table"

    def __init__(self, table: dict[str, dict[str, float]]) -> None:
        self.table = table
        self.calls: list[list] = []

    def score(self, items: list[tuple[Prompt, Candidate]]) -> list[Judgment]:
        self.calls.append(items)
        out = []
        for p, c in items:
            if c.id in self.table:
                out.append(Judgment(p.id, [c.id], self.name, scores=self.table[c.id]))
            else:
                out.append(Judgment(p.id, [c.id], self.name, status="invalid", reason="no score"))
        return out


class CrashingJudge:
    name = "crash"

    def compare(self, items: list) -> list[Judgment]:
        raise RuntimeError("backend down")


def _data(after_lengths: list[int], before_lengths: list[int]) -> tuple[list, list, list]:
    prompts = [Prompt(id=f"p{i}", prompt=f"question {i}") for i in range(len(after_lengths))]
    before = [Candidate(p.id, f"{p.id}-b", "b" * n) for p, n in zip(prompts, before_lengths, strict=True)]
    after = [Candidate(p.id, f"{p.id}-a", "a" * n) for p, n in zip(prompts, after_lengths, strict=True)]
    return prompts, before, after


# after longer in 3 prompts, shorter in 1, equal in 1: outcomes [1, 1, 1, 0, 0.5]
AFTER, BEFORE = [30, 40, 50, 10, 20], [10, 20, 30, 40, 20]


def test_pairwise_longer_judge_exact() -> None:
    judge = LongerJudge()
    r = heldout_winrate(judge, *_data(AFTER, BEFORE))
    assert r["outcomes"] == [1.0, 1.0, 1.0, 0.0, 0.5]
    assert r["win_rate"] == pytest.approx(0.7)
    # sd(ddof=1) = sqrt(0.8 / 4) = sqrt(0.2); half = 1.96 * sqrt(0.2) / sqrt(5) = 0.392
    assert r["ci95_low"] == pytest.approx(0.308)
    assert r["ci95_high"] == 1.0  # 1.092 clipped
    assert r["n"] == 5 and r["ties"] == 1 and r["excluded"] == {}
    assert r["both_order_consistency"] == 1.0
    assert r["judge"] == "longer" and r["kind"] == "pairwise"
    # a purely length-driven judge: length control pulls the win rate towards 0.5
    assert r["lc_win_rate"] is not None and abs(r["lc_win_rate"] - 0.5) < abs(r["win_rate"] - 0.5)
    assert r["theta_len"] > 0


def test_compare_is_one_batched_call_in_both_orders() -> None:
    judge = LongerJudge()
    prompts, before, after = _data(AFTER, BEFORE)
    heldout_winrate(judge, prompts, before, after)
    assert len(judge.calls) == 1
    items = judge.calls[0]
    assert len(items) == 10
    assert [(p.id, x.id, y.id) for p, x, y in items[:5]] == [(p.id, a.id, b.id) for p, b, a in
                                                            zip(prompts, before, after, strict=True)]
    assert [(p.id, x.id, y.id) for p, x, y in items[5:]] == [(p.id, b.id, a.id) for p, b, a in
                                                            zip(prompts, before, after, strict=True)]


def test_all_ties_count_half() -> None:
    r = heldout_winrate(LongerJudge(), *_data([7, 7, 7, 7], [7, 7, 7, 7]))
    assert r["win_rate"] == 0.5 and r["ties"] == 4
    assert r["ci95_low"] == r["ci95_high"] == 0.5
    assert r["both_order_consistency"] == 1.0


def test_position_biased_judge_is_exactly_half_and_inconsistent() -> None:
    r = heldout_winrate(FirstJudge(), *_data(AFTER, BEFORE))
    assert r["win_rate"] == 0.5
    assert r["outcomes"] == [0.5] * 5
    assert r["both_order_consistency"] == 0.0
    assert r["ties"] == 5


def test_pointwise_judge_exact() -> None:
    prompts, before, after = _data([1, 1, 1, 1], [1, 1, 1, 1])
    table = {
        "p0-a": {"overall": 8.0}, "p0-b": {"overall": 5.0},  # win
        "p1-a": {"x": 2.0, "y": 4.0}, "p1-b": {"x": 3.0, "y": 3.0},  # means 3 = 3: tie
        "p2-a": {"s": 1.0}, "p2-b": {"s": 2.0},  # loss
        "p3-a": {"s": 9.0}, "p3-b": {"s": 0.0},  # win
    }
    judge = TableScorer(table)
    r = heldout_winrate(judge, prompts, before, after)
    assert len(judge.calls) == 1 and len(judge.calls[0]) == 8
    assert r["outcomes"] == [1.0, 0.5, 0.0, 1.0]
    assert r["win_rate"] == pytest.approx(0.625)
    assert r["ties"] == 1 and r["n"] == 4
    assert r["both_order_consistency"] is None and r["kind"] == "pointwise"


def test_pointwise_invalid_excluded() -> None:
    prompts, before, after = _data([1, 1, 1], [1, 1, 1])
    table = {"p0-a": {"s": 2.0}, "p0-b": {"s": 1.0}, "p1-a": {"s": 1.0}, "p2-a": {"s": 1.0}, "p2-b": {"s": 3.0}}
    r = heldout_winrate(TableScorer(table), prompts, before, after)
    assert r["outcomes"] == [1.0, None, 0.0]
    assert r["excluded"] == {"invalid": 1}
    assert r["n"] == 2 and r["win_rate"] == 0.5


def test_pairwise_failed_judgments_excluded_and_counted() -> None:
    status = {("p0", 0): "error", ("p0", 1): "error",  # both orders error -> excluded as error
              ("p1", 0): "invalid", ("p1", 1): "error",  # mixed -> excluded as invalid
              ("p2", 1): "invalid"}  # one ok order (a win) -> counts alone
    r = heldout_winrate(LongerJudge(status), *_data(AFTER, BEFORE))
    assert r["outcomes"] == [None, None, 1.0, 0.0, 0.5]
    assert r["excluded"] == {"error": 1, "invalid": 1}
    assert r["n"] == 3 and r["win_rate"] == pytest.approx(0.5)
    assert r["both_order_consistency"] == 1.0  # p3, p4 (p2 has one order only)


def test_judge_crash_excludes_everything() -> None:
    r = heldout_winrate(CrashingJudge(), *_data(AFTER, BEFORE))
    assert r["n"] == 0 and r["excluded"] == {"error": 5}
    assert r["win_rate"] is None and r["ci95_low"] is None and r["lc_win_rate"] is None
    assert r["outcomes"] == [None] * 5


def test_mismatched_ids_and_lengths_raise() -> None:
    prompts, before, after = _data(AFTER, BEFORE)
    after[2] = Candidate("p9", "x", "text")
    with pytest.raises(ValueError, match="p9"):
        heldout_winrate(LongerJudge(), prompts, before, after)
    prompts, before, after = _data(AFTER, BEFORE)
    with pytest.raises(ValueError):
        heldout_winrate(LongerJudge(), prompts, before[:4], after)


def test_empty_prompt_set_makes_no_call() -> None:
    judge = LongerJudge()
    r = heldout_winrate(judge, [], [], [])
    assert judge.calls == [] and r["n"] == 0 and r["win_rate"] is None


def test_ci_contains_estimate_and_shrinks_with_n() -> None:
    widths = []
    for k in (1, 4, 16):
        r = heldout_winrate(LongerJudge(), *_data(AFTER * k, BEFORE * k))
        assert r["win_rate"] == pytest.approx(0.7)
        assert r["ci95_low"] <= r["win_rate"] <= r["ci95_high"]
        widths.append(r["ci95_high"] - r["ci95_low"])
    assert widths[0] > widths[1] > widths[2]
    # unclipped at n = 80: half width = 1.96 * sd / sqrt(80), sd with ddof=1
    sd = math.sqrt(sum((o - 0.7) ** 2 for o in [1, 1, 1, 0, 0.5] * 16) / 79)
    assert widths[2] == pytest.approx(2 * 1.96 * sd / math.sqrt(80))


def test_mean_ci95_edge_cases() -> None:
    assert mean_ci95([]) == (None, None, None)
    assert mean_ci95([1.0]) == (1.0, 0.0, 1.0)
    assert mean_ci95([0.0, 0.0]) == (0.0, 0.0, 0.0)
