"""Remembered judgments: a judge is asked each question once, across ensembles, calls and runs."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from alignpipe.cli import app
from alignpipe.evaluation.judge_eval import evaluate_judge
from alignpipe.evaluation.judge_registry import JudgeRegistry
from alignpipe.evaluation.judgment_cache import CachedJudge, JudgmentStore
from alignpipe.records import Candidate, Judgment, Prompt


class CountingJudge:
    """Pointwise: score = number of 'good' in the completion; 'garbage' is an invalid verdict."""

    name = "counting"

    def __init__(self) -> None:
        self.asked: list[str] = []

    def score(self, items):
        out = []
        for p, c in items:
            self.asked.append(c.completion)
            status = "invalid" if "garbage" in c.completion else "ok"
            out.append(Judgment(prompt_id=p.id, candidate_ids=[c.id], judge=self.name, status=status,
                                scores={} if status != "ok" else {"score": float(c.completion.count("good"))}))
        return out


def _items(ids=("a", "b")):
    p = Prompt(id="p-" + ids[0], prompt="Say something.")
    return [(p, Candidate(prompt_id=p.id, id=f"{ids[0]}1", completion="good good")),
            (p, Candidate(prompt_id=p.id, id=f"{ids[1]}2", completion="good")),
            (p, Candidate(prompt_id=p.id, id=f"{ids[1]}3", completion="garbage"))]


def test_second_call_is_answered_from_memory_with_current_ids():
    inner = CountingJudge()
    judge = CachedJudge(inner, JudgmentStore())
    first = judge.score(_items())
    again = judge.score(_items(ids=("x", "y")))  # same texts, other ids
    assert [j.scores.get("score") for j in first] == [2.0, 1.0, None]
    assert [j.scores.get("score") for j in again] == [2.0, 1.0, None]
    assert [j.candidate_ids for j in again] == [["x1"], ["y2"], ["y3"]] and again[0].prompt_id == "p-x"
    # the two valid items were not asked again; the invalid one was
    assert inner.asked == ["good good", "good", "garbage", "garbage"]
    assert judge.hits == 2
    assert not callable(getattr(judge, "compare", None))  # a pointwise judge stays pointwise


def test_store_on_disk_is_reused_by_a_new_run(tmp_path):
    CachedJudge(CountingJudge(), JudgmentStore(tmp_path)).score(_items())
    lines = (tmp_path / "counting.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["judgment"]["status"] == "ok" for line in lines)
    (tmp_path / "counting.jsonl").write_text("\n".join(lines) + '\n{"key": "cut short')  # a killed write
    inner = CountingJudge()
    out = CachedJudge(inner, JudgmentStore(tmp_path)).score(_items())
    assert inner.asked == ["garbage"] and [j.scores.get("score") for j in out] == [2.0, 1.0, None]


def test_ensemble_member_judged_alone_is_not_asked_again():
    registry = JudgeRegistry()
    registry._judges["pointwise"] = CachedJudge(CountingJudge(), registry.store)  # stand-in for an LLM judge
    alone = registry.resolve("pointwise")
    ensemble = registry.resolve("ensemble:mean:pointwise+longer")
    pairs = [(p, a, b) for (p, a), (_, b) in [(_items()[0], _items()[1])]]
    evaluate_judge(pairs, alone)
    row = evaluate_judge(pairs, ensemble)
    assert alone.judge.asked == ["good good", "good"]  # the ensemble's pass reused both scores
    assert row["cached_items"] == 2 and row["pairs_per_s"] != row["pairs_per_s"]  # NaN: not the judge's time


def _longer_is_chosen(tmp_path, n: int, base_reps: int):
    """n hh-format pairs in a jsonl file whose chosen answer is always the longer one."""
    rows = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: {'long answer ' * (i % 3 + base_reps)}",
             "rejected": f"\n\nHuman: q{i}\n\nAssistant: no"} for i in range(n)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_judge_eval_test_split_selects_the_held_out_pairs(tmp_path):
    from alignpipe.data.pairs import load_pairs
    from alignpipe.evaluation.reward_model import split_pairs

    path = _longer_is_chosen(tmp_path, 10, 1)
    out = tmp_path / "out.json"
    md = tmp_path / "out.md"
    result = CliRunner().invoke(app, ["judge-eval", "--pairs", str(path), "--judge", "longer", "--test-split", "0.6",
                                      "--split-seed", "3", "--json", str(out), "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    _, test = split_pairs(load_pairs(str(path)), 0.6, 3)
    table = json.loads(out.read_text())
    assert [r["n"] for r in table] == [len(test), len(test)] == [4, 4]
    assert table[1]["agreement"] == 1.0  # the chosen answer is always the longer one
    text = md.read_text()
    assert "test split: 4 of 10" in text and "| `longer` | pointwise | 4 | 100.0% |" in text


def test_weighted_ensemble_is_fitted_on_the_train_part(tmp_path):
    path = _longer_is_chosen(tmp_path, 12, 2)
    out = tmp_path / "out.json"
    spec = "ensemble:weighted:longer+shorter"
    result = CliRunner().invoke(app, ["judge-eval", "--pairs", str(path), "--judge", spec, "--test-split", "0.5",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "fitting" in result.output
    row = json.loads(out.read_text())[1]
    assert row["n"] == 6 and row["agreement"] == 1.0  # the fitted weights favour the longer response
    unfitted = CliRunner().invoke(app, ["judge-eval", "--pairs", str(path), "--judge", spec])
    assert unfitted.exit_code != 0 and "--test-split" in str(unfitted.exception)
