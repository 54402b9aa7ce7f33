"""The whole closed loop on a tiny random model: run directory, summary, resume, loadable final model."""

import json

import pytest

from alignpipe.config import Recipe
from alignpipe.loop import run


@pytest.fixture()
def recipe(tmp_path, tiny_model_path):
    prompts = tmp_path / "prompts.jsonl"
    # Answers are single digits, so even a random model's samples are sometimes right: pairs form.
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + 0?", "answer": str(i % 3)}) + "\n"
                               for i in range(40)))
    return Recipe.model_validate({
        "name": "tiny", "model": str(tiny_model_path), "rounds": 2, "output_dir": str(tmp_path / "runs"),
        "task": {"kind": "file", "path": str(prompts), "heldout_fraction": 0.25},
        "synthesis": {"prompts_per_round": 8, "samples_per_prompt": 6, "max_new_tokens": 6, "temperature": 1.0},
        "optimization": {"objectives": [{"name": "dpo"}, {"name": "sft", "weight": 0.5}], "batch_size": 4,
                         "adapter": {"r": 4, "alpha": 8}},
        "heldout": {"n": 10, "max_new_tokens": 6},
    })


def test_loop_writes_run_directory_and_resumes(recipe, tmp_path):
    summary = run(recipe)
    run_dir = tmp_path / "runs" / "tiny"
    for r in ("round-00", "round-01"):
        for name in ("prompts.parquet", "candidates.parquet", "judgments.parquet", "examples.parquet", "metrics.json"):
            assert (run_dir / r / name).is_file(), (r, name)
        assert (run_dir / r / "checkpoint" / "adapter_config.json").is_file()
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["before"]["n"] == on_disk["after"]["n"] == 10
    assert 0 <= on_disk["after"]["accuracy"] <= 1
    assert len(on_disk["rounds"]) == 2 and sum(r["examples"] for r in on_disk["rounds"]) > 0
    assert any(r["train"]["steps"] > 0 for r in on_disk["rounds"])

    # A second run with the same recipe reuses every stage: same rows, same summary.
    stamp = (run_dir / "round-01" / "candidates.parquet").stat().st_mtime_ns
    again = run(recipe)
    assert (run_dir / "round-01" / "candidates.parquet").stat().st_mtime_ns == stamp
    assert again["after"] == summary["after"] and again["rounds"] == summary["rounds"]

    # The final model loads with plain transformers + peft, without alignpipe.
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(summary["final_model"])
    assert model.peft_config


def test_killed_run_resumes_from_last_completed_stage(recipe, tmp_path):
    """Simulate a kill after round 0's candidates: the next run reuses them and finishes."""
    full = run(recipe.model_copy(update={"name": "full"}))
    killed = recipe.model_copy(update={"name": "killed"})
    run_dir = tmp_path / "runs" / "killed"
    run(killed)
    import shutil

    # Remove everything after round 0's candidates, as if the process had died there.
    for name in ("judgments.parquet", "judgments.parquet.fingerprint", "examples.parquet", "metrics.json",
                 "checkpoint", "checkpoint.fingerprint"):
        target = run_dir / "round-00" / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    shutil.rmtree(run_dir / "round-01")
    (run_dir / "summary.json").unlink()
    resumed = run(killed)
    assert resumed["after"] == full["after"]
    assert [r["examples"] for r in resumed["rounds"]] == [r["examples"] for r in full["rounds"]]


def test_offline_preference_loop_without_reference(tmp_path, tiny_model_path):
    """SimPO on real hh-rlhf pairs: offline candidates, human labels, dataset pairs, no reference pass."""
    from conftest import SHARED

    path = SHARED / "data" / "hh-rlhf-harmless" / "dev.jsonl"
    if not path.is_file():
        pytest.skip("shared/data is not beside the repository")
    recipe = Recipe.model_validate({
        "name": "offline", "model": str(tiny_model_path), "rounds": 1, "output_dir": str(tmp_path / "runs"),
        "task": {"kind": "preferences", "path": str(path), "limit": 24, "heldout_fraction": 0.25},
        "synthesis": {"backend": "offline", "prompts_per_round": 18}, "evaluation": {"judge": "human_label"},
        "optimization": {"objectives": [{"name": "simpo"}], "batch_size": 6, "max_length": 128},
        "heldout": {"n": 6},
    })
    summary = run(recipe)
    assert summary["heldout_metric"] == "pair_preference" and summary["before"]["n"] == 6
    r0 = summary["rounds"][0]
    assert r0["examples"] == 18 and r0["skipped_uniform"] == 0 and r0["train"]["steps"] == 3
    import pyarrow.parquet as pq

    examples = pq.read_table(tmp_path / "runs" / "offline" / "round-00" / "examples.parquet").to_pylist()
    assert all(e["margin"] == 1.0 for e in examples)
