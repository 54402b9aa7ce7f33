"""The synthesis stage inside the loop, on a tiny random model: sources (self_play, teacher mixtures, offline),
selection with a budget, DivPO pairs, verbalized sampling and DAPO's dynamic sampling, and the load-time
errors of bad synthesis settings."""

import json

import pandas as pd
import pytest
from pydantic import ValidationError

from alignpipe import AlignpipeError
from alignpipe.config import Recipe
from alignpipe.loop import run
from alignpipe.records import Candidate, read_records


def _prompts(tmp_path, n=40, response=True):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"What is {i} + 0?", "answer": str(i % 3), **({"response": str(i % 3)} if response else {})}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tmp_path, model, name="syn", **overrides):
    base = {
        "name": name, "model": str(model), "rounds": 1, "output_dir": str(tmp_path / "runs"),
        "task": {"kind": "file", "path": str(_prompts(tmp_path)), "heldout_fraction": 0.25},
        "synthesis": {"prompts_per_round": 6, "samples_per_prompt": 4, "max_new_tokens": 5, "temperature": 1.0},
        "optimization": {"objectives": [{"name": "dpo"}], "batch_size": 4, "adapter": {"r": 4, "alpha": 8}},
        "heldout": {"n": 4, "max_new_tokens": 4},
    }
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return Recipe.model_validate(base)


def _round(tmp_path, name="syn"):
    """The round's candidates (with their `source` dicts as a column), examples and metrics."""
    rd = tmp_path / "runs" / name / "round-00"
    cands = pd.DataFrame([vars(c) for c in read_records(rd / "candidates.parquet", Candidate)])
    return cands, pd.read_parquet(rd / "examples.parquet"), json.loads((rd / "metrics.json").read_text())


def test_self_play_prefers_gold_over_policy_samples(tmp_path, tiny_model_path):
    """SPIN: each prompt's gold response (the file's `response`) plus k policy samples; the provenance judge
    makes every pair gold (chosen) against a policy sample (rejected)."""
    run(_recipe(tmp_path, tiny_model_path, synthesis={"source": "self_play", "samples_per_prompt": 2},
                evaluation={"judge": "provenance"}))
    cands, examples, metrics = _round(tmp_path)
    sources = [s["source"] for s in cands["source"]]
    assert sources.count("gold") == 6 and sources.count("policy") == 12
    assert len(examples) == 6
    assert set(cands["prompt_id"]) == set(examples["prompt_id"])
    # the chosen text is each prompt's gold response
    golds = cands[[s == "gold" for s in sources]].set_index("prompt_id")["completion"]
    assert all(golds[row.prompt_id] == row.chosen for row in examples.itertuples())
    div = metrics["diversity"]
    assert div["candidates"] == 18 and 0 <= div["distinct_1"] <= 1 and 0 <= div["pairwise_overlap_2"] <= 1


def test_mixture_of_teacher_and_policy_records_each_source(tmp_path, tiny_model_path):
    run(_recipe(tmp_path, tiny_model_path, synthesis={"source": "mixture", "mixture": [
        {"source": "policy", "k": 2}, {"source": "teacher", "k": 3, "model": str(tiny_model_path),
                                       "temperature": 0.0}]}, evaluation={"judge": "provenance"}))
    cands, examples, _ = _round(tmp_path)
    per_prompt = cands.groupby("prompt_id").size()
    assert (per_prompt == 5).all()
    sources = [s["source"] for s in cands["source"]]
    assert sources.count("teacher") == 18 and sources.count("policy") == 12
    teacher = [s for s in cands["source"] if s["source"] == "teacher"]
    assert all(s["temperature"] == 0.0 and s["model"] == str(tiny_model_path) for s in teacher)
    # greedy teacher samples of one prompt are identical
    t = cands[[s == "teacher" for s in sources]]
    assert (t.groupby("prompt_id")["completion"].nunique() == 1).all()
    assert len(examples) == 6


def test_score_margin_selection_keeps_the_budget(tmp_path, tiny_model_path):
    run(_recipe(tmp_path, tiny_model_path, synthesis={"source": "self_play", "samples_per_prompt": 2},
                evaluation={"judge": "provenance"},
                instantiation={"selection": {"rule": "score_margin", "budget": 4, "min_margin": 0.5}}))
    _, examples, metrics = _round(tmp_path)
    sel = metrics["selection"]
    assert sel["rule"] == "score_margin" and sel["considered"] == 6 and sel["kept"] == 4 == len(examples)
    assert sel["mean_margin"] == pytest.approx(1.0)
    assert sel["dropped"]["over_budget"] == 2


def test_random_selection_by_prompt(tmp_path, tiny_model_path):
    run(_recipe(tmp_path, tiny_model_path, synthesis={"source": "self_play", "samples_per_prompt": 2},
                evaluation={"judge": "provenance"},
                instantiation={"selection": {"rule": "random", "budget": 3, "unit": "prompt"}}))
    _, examples, metrics = _round(tmp_path)
    assert examples["prompt_id"].nunique() == 3 and metrics["selection"]["kept"] == len(examples)


def test_divpo_pairs_in_the_loop(tmp_path, tiny_model_path):
    run(_recipe(tmp_path, tiny_model_path, synthesis={"source": "self_play", "samples_per_prompt": 3},
                evaluation={"judge": "provenance"}, instantiation={"pairs": "divpo", "divpo_threshold": 0.5}))
    cands, examples, metrics = _round(tmp_path)
    assert len(examples) == 6  # one gold above the threshold, three policy samples below, per prompt
    assert metrics["instantiation"] == {"no_above": 0, "no_below": 0}


def test_verbalized_sampling_counts_parses(tmp_path, tiny_model_path):
    """A random model writes no numbered list: every response is an invalid parse, counted, and the round
    still finishes (no candidates, no examples)."""
    run(_recipe(tmp_path, tiny_model_path, synthesis={"verbalized": 3, "samples_per_prompt": 3}))
    _, examples, metrics = _round(tmp_path)
    stats = metrics["sampling"]["verbalized"]
    assert stats["responses"] == 6 and stats["expected"] == 18
    assert stats["parsed"] + stats["empty"] + stats["cut_off"] <= 18
    assert 0 <= stats["invalid_rate"] <= 1 and metrics["candidates"] == stats["parsed"]


def test_dynamic_sampling_replaces_tied_prompts(tmp_path, tiny_model_path):
    """With greedy sampling every candidate of a prompt is the same, so every group ties: each extra pass
    draws fresh prompts, they tie as well, and the round stops after `dynamic_sampling` passes."""
    run(_recipe(tmp_path, tiny_model_path, synthesis={"temperature": 0.0, "dynamic_sampling": 2},
                instantiation={"kind": "group"},
                optimization={"objectives": [{"name": "grpo"}]}))
    rd = tmp_path / "runs" / "syn" / "round-00"
    _, _, metrics = _round(tmp_path)
    dyn = metrics["dynamic_sampling"]
    assert dyn["attempts"] == 2 and dyn["stop"] == "max_attempts" and dyn["sampled"] == 12
    assert dyn["replaced"] == 18 and dyn["final"] == 0
    assert len(list(rd.glob("dynamic-*-candidates.parquet"))) == 2
    # the fresh prompts are new ones
    fresh = pd.concat([pd.read_parquet(p) for p in rd.glob("dynamic-*-prompts.parquet")])
    assert not set(fresh["id"]) & set(pd.read_parquet(rd / "prompts.parquet")["id"])


@pytest.mark.parametrize("synthesis, match", [
    ({"source": "replay"}, "synthesis.source"),
    ({"backend": "sglang"}, "synthesis.backend"),
    ({"source": "teacher", "teacher": "/no/such/model"}, "does not exist"),
    ({"source": "teacher"}, "needs synthesis.teacher"),
    ({"backend": "openai"}, "needs synthesis.server"),
    ({"backend": "vllm"}, "vllm"),
    ({"source": "mixture", "mixture": [{"source": "teacher", "k": 2}]}, "needs `model`"),
])
def test_bad_synthesis_settings_fail_at_load(tmp_path, tiny_model_path, synthesis, match):
    with pytest.raises(ValidationError, match=match):
        _recipe(tmp_path, tiny_model_path, synthesis=synthesis)


@pytest.mark.parametrize("selection, match", [
    ({"rule": "best"}, "rule"),
    ({"rule": "uncertainty"}, "needs measure"),
    ({"rule": "random", "eta": 0.8}, "for rule 'score_margin'"),
    ({"rule": "implicit_margin", "keep": "most"}, "not a choice"),
    ({"rule": "score_margin", "budget": 0}, "budget"),
])
def test_bad_selection_fails_at_load(tmp_path, tiny_model_path, selection, match):
    with pytest.raises(ValidationError, match=match):
        _recipe(tmp_path, tiny_model_path, instantiation={"selection": selection})


def test_self_play_without_gold_fails_before_model_work(tmp_path, tiny_model_path):
    recipe = _recipe(tmp_path, tiny_model_path, synthesis={"source": "self_play"},
                     evaluation={"judge": "provenance"})
    recipe.task.path = str(_prompts(tmp_path, response=False))
    with pytest.raises(AlignpipeError, match="needs a gold response"):
        run(recipe)


def test_distill_from_a_llama_cpp_teacher_server(tmp_path, tiny_model_path, llama_server):
    """Distillation with the teacher behind a real OpenAI-compatible server (llama.cpp on the embedded GGUF):
    the teacher's answers are the chosen side of every pair and the SFT target."""
    run(_recipe(tmp_path, tiny_model_path, synthesis={"source": "mixture", "max_new_tokens": 8, "mixture": [
        {"source": "teacher", "k": 2, "model": f"{llama_server}#smollm2-135m-instruct", "temperature": 0.0},
        {"source": "policy", "k": 1}]}, evaluation={"judge": "provenance"},
        optimization={"objectives": [{"name": "sft"}]}))
    cands, examples, metrics = _round(tmp_path)
    teacher = cands[[s["source"] == "teacher" for s in cands["source"]]]
    assert len(teacher) == 12 and all(s["backend"] == "openai" for s in teacher["source"])
    assert teacher["completion"].str.len().gt(0).all() and metrics["sampling"]["failed"] == 0
    assert len(examples) == 6 and set(examples["chosen"]) <= set(teacher["completion"])
    assert metrics["train"]["steps"] > 0
