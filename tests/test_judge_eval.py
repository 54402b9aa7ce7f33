"""judge-eval: agreement, position consistency, invalid rate and length bias on hand-made judges and pairs;
the judge registry; the command and its JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignpipe import AlignpipeError
from alignpipe.data.pairs import make_pair
from alignpipe.evaluation.judge_eval import evaluate_judge, evaluate_judges, judge_eval_command
from alignpipe.evaluation.judge_registry import LengthJudge, resolve_judge, resolve_judges
from alignpipe.records import Judgment

# chosen lengths vs rejected lengths: longer, shorter, longer, shorter
PAIRS = [make_pair(f"p{i}", [{"role": "user", "content": f"q{i}"}], c, r)
         for i, (c, r) in enumerate([("aaaa", "b"), ("c", "dddd"), ("eeeeee", "ff"), ("g", "hhh")])]


class Oracle:
    """Pairwise: knows the human label; optionally invalid on one (pair, order)."""

    name = "oracle"

    def __init__(self, invalid: set[tuple[str, str]] = frozenset()) -> None:
        self.invalid = invalid

    def compare(self, items: list) -> list[Judgment]:
        out = []
        for p, a, b in items:
            j = Judgment(prompt_id=p.id, candidate_ids=[a.id, b.id], judge=self.name)
            if (a.id, b.id) in self.invalid:
                j.status, j.reason = "invalid", "unparseable"
            else:
                j.preference = "first" if a.id.endswith("/chosen") else "second"
            out.append(j)
        return out


class AlwaysFirst:
    name = "always-first"

    def compare(self, items: list) -> list[Judgment]:
        return [Judgment(prompt_id=p.id, candidate_ids=[a.id, b.id], judge=self.name, preference="first")
                for p, a, b in items]


class Broken:
    name = "broken"

    def compare(self, items: list) -> list[Judgment]:
        raise ConnectionError("server down")


class TableScores:
    name = "table"

    def __init__(self, table: dict[str, float | None]) -> None:
        self.table = table

    def score(self, items: list) -> list[Judgment]:
        return [Judgment(prompt_id=p.id, candidate_ids=[c.id], judge=self.name,
                         scores={} if self.table[c.id] is None else {"s": self.table[c.id]},
                         status="ok" if self.table[c.id] is not None else "invalid")
                for p, c in items]


def test_oracle_agrees_and_is_consistent() -> None:
    row = evaluate_judge(PAIRS, Oracle())
    assert row["kind"] == "pairwise" and row["n"] == 4
    assert row["agreement"] == 1.0 and row["agreement_single"] == 1.0 and row["position_consistency"] == 1.0
    assert row["invalid_rate"] == 0.0 and row["tie_rate"] == 0.0
    assert row["longer_rate"] == 0.5  # it picked the longer response in 2 of 4 decisive pairs
    assert row["pairs_per_s"] > 0


def test_position_biased_judge_ties_in_both_orders() -> None:
    row = evaluate_judge(PAIRS, AlwaysFirst())
    # forward order: picks chosen; swapped order: picks rejected -> inconsistent everywhere -> ties
    assert row["agreement"] == 0.5 and row["agreement_single"] == 0.5
    assert row["position_consistency"] == 0.0 and row["tie_rate"] == 1.0
    assert row["lc_agreement"] == pytest.approx(0.5)


def test_invalid_order_makes_the_pair_count_half() -> None:
    row = evaluate_judge(PAIRS, Oracle(invalid={("p0/rejected", "p0/chosen")}))
    assert row["invalid_rate"] == pytest.approx(1 / 8) and row["pair_invalid_rate"] == 0.25
    assert row["agreement"] == pytest.approx((0.5 + 3) / 4)
    assert row["agreement_single"] == pytest.approx((7 + 0.5) / 8)
    assert row["position_consistency"] == 1.0 and row["consistency_n"] == 3
    assert row["sample_reasons"] == ["unparseable"]


def test_a_crashing_judge_is_a_row_of_errors() -> None:
    row = evaluate_judge(PAIRS, Broken())
    assert row["agreement"] == 0.5 and row["invalid_rate"] == 1.0 and row["errors"] == 8
    assert "ConnectionError: server down" in row["sample_reasons"][0]


def test_pointwise_judge_by_hand() -> None:
    table = {"p0/chosen": 3.0, "p0/rejected": 1.0,  # right
             "p1/chosen": 1.0, "p1/rejected": 2.0,  # wrong
             "p2/chosen": 5.0, "p2/rejected": 5.0,  # tie
             "p3/chosen": None, "p3/rejected": 0.0}  # invalid
    row = evaluate_judge(PAIRS, TableScores(table))
    assert row["kind"] == "pointwise" and row["position_consistency"] == 1.0
    assert row["agreement"] == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    assert row["invalid_rate"] == pytest.approx(1 / 8) and row["tie_rate"] == 0.25
    assert "by construction" in row["note"]
    # p0 picked the longer (chosen, 4 > 1 chars); p1 picked the longer (rejected, 4 > 1 chars)
    assert row["longer_rate"] == 1.0 and row["n_decisive"] == 2


def test_length_baselines_and_human_reference() -> None:
    rows = evaluate_judges(PAIRS, [LengthJudge("longer"), LengthJudge("shorter")])
    human, longer, shorter = rows
    assert human["kind"] == "reference" and human["longer_rate"] == 0.5
    assert longer["agreement"] == 0.5 and longer["longer_rate"] == 1.0 and longer["length_corr"] > 0.8
    assert shorter["longer_rate"] == 0.0 and shorter["length_corr"] < -0.8


def test_registry(tmp_path: Path) -> None:
    assert resolve_judge("longer").name == "longer"
    vote = resolve_judge("ensemble:vote:longer+shorter")
    assert [m.name for m in vote.members] == ["longer", "shorter"]
    assert resolve_judge("ensemble:meta:longer+shorter+longer").arbiter.name == "longer"
    assert resolve_judge("ensemble:median:longer+shorter").reduce == "median"
    for spec, message in [("nope", "unknown judge"), ("reward-model:", "needs a directory"),
                          ("ensemble:mean:longer", "at least two members"), ("ensemble:sum:longer+shorter", "kind"),
                          (f"reward-model:{tmp_path}", "no config.json"),
                          (f"pairwise:{tmp_path / 'missing'}", "does not exist"),
                          ("pairwise:http://localhost:1/v1", "URL#MODEL")]:
        with pytest.raises(AlignpipeError, match=message):
            resolve_judges([spec])


def test_llm_judges_resolve_on_a_local_backend(tiny_model_path: Path) -> None:
    judges = resolve_judges([f"pairwise:{tiny_model_path}", f"pointwise:{tiny_model_path}",
                             f"both-orders:pairwise:{tiny_model_path}"])
    assert judges[0].backend is judges[1].backend  # one model load for judges on the same backend
    assert callable(getattr(judges[2], "compare", None)) and judges[2].inner.backend is judges[0].backend
    with pytest.raises(AlignpipeError, match="pointwise"):
        resolve_judge(f"both-orders:pointwise:{tiny_model_path}")


def test_command_writes_strict_json(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": "x" * (i + 1), "rejected": "yy"})
                               for i in range(5)) + "\n")
    out = tmp_path / "out" / "eval.json"
    from rich.console import Console

    console = Console(record=True, width=200)
    rows = judge_eval_command(str(pairs), ["longer", "ensemble:vote:longer+shorter"], json_out=str(out), limit=4,
                              console=console)
    assert [r["judge"] for r in rows] == ["human", "longer", "vote(longer,shorter)"] and rows[1]["n"] == 4
    text = out.read_text()
    assert "NaN" not in text and json.loads(text)[0]["length_corr"] is None
    assert "judge evaluation on 4 human-labelled pairs" in console.export_text()
    with pytest.raises(AlignpipeError, match="at least one --judge"):
        judge_eval_command(str(pairs), [])


def test_typer_wiring(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from alignpipe.evaluation.judge_eval_cli import judge_eval

    app = typer.Typer()
    app.command("judge-eval")(judge_eval)
    app.command("other")(lambda: None)
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"prompt": "q", "chosen": "long answer", "rejected": "no"}) + "\n")
    result = CliRunner().invoke(app, ["judge-eval", "--pairs", str(pairs), "--judge", "longer", "--judge", "shorter",
                                      "--json", str(tmp_path / "o.json"), "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert [r["judge"] for r in json.loads((tmp_path / "o.json").read_text())] == ["human", "longer", "shorter"]
