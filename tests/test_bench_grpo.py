"""The GRPO benchmark (benchmarks/grpo.py): both sides run one tiny round end to end on the tiny model and return
well-formed per-round records; the TRL reward is alignpipe's verifier; the derived figures on hand-made curves.
Asserts nothing about wall-clock speed."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import script_module

pytestmark = pytest.mark.usefixtures("one_thread")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "grpo.py"
TINY = ["synthesis.prompts_per_round=4", "synthesis.samples_per_prompt=2", "synthesis.max_new_tokens=4",
        "heldout.n=4", "heldout.max_new_tokens=4", "optimization.batch_size=2", "optimization.epochs=1",
        "optimization.precision=fp32", "optimization.gradient_checkpointing=false", "rounds=1"]


@pytest.fixture(scope="module")
def bench():
    yield from script_module(BENCH, "bench_grpo")


def well_formed(result: dict, rounds: int) -> None:
    points = result["points"]
    assert [p["round"] for p in points] == list(range(rounds + 1))
    assert all(0.0 <= p["accuracy"] <= 1.0 for p in points)
    seconds = [p["seconds"] for p in points]
    assert seconds[0] == 0.0 and all(b > a for a, b in zip(seconds, seconds[1:], strict=False))


def test_both_sides_run_one_tiny_round(bench, tiny_model_path, tmp_path):
    pytest.importorskip("trl", reason="TRL is in the bench extra only: pip install -e '.[bench]'")
    overrides = [f"model={tiny_model_path}", *TINY]
    ours = bench.run_alignpipe(bench.RunSpec("alignpipe", "grpo-arithmetic", overrides, str(tmp_path / "a"),
                                             threads=1))
    well_formed(ours, 1)
    assert ours["last_round_matches_summary"] and ours["torch_threads"] == 1
    recipe = bench.bench_recipe(bench.RunSpec("check", "grpo-arithmetic", overrides, ""))
    run_dir = Path(ours["run_dir"])
    same = [[p.id for p in r] for r in bench.run_prompts(run_dir, 1)] == [[p.id for p in r] for r in
                                                                          bench.loop_prompts(recipe)]
    assert same  # the loop's prompts, as the TRL side computes them without an alignpipe run

    theirs = bench.run_trl(bench.RunSpec("trl", "grpo-arithmetic", overrides, str(tmp_path / "t"), str(run_dir),
                                         threads=1))
    well_formed(theirs, 1)
    # 4 prompts x 2 samples per generation, batches of 2 groups: 2 optimizer steps per round
    assert (theirs["settings"]["per_device_train_batch_size"], theirs["settings"]["steps_per_generation"],
            theirs["settings"]["max_steps"]) == (4, 2, 2)
    assert theirs["points"][1]["steps"] == 2 and theirs["prompts_with_added_tokens"] == 0
    assert theirs["prompts_as_planned"]  # TRL sampled the alignpipe round's prompts, in order
    assert not theirs["gradient_checkpointing"]
    assert theirs["points"][0]["accuracy"] == ours["points"][0]["accuracy"]  # the same base, the same evaluation

    figures = bench.derived({"alignpipe": ours, "trl": theirs}, 0.4)
    assert figures["trl_final_accuracy"] == theirs["points"][-1]["accuracy"]
    assert set(figures["accuracy_at_equal_wall"]) == {"alignpipe", "trl"}


def test_reward_is_alignpipes_verifier(bench):
    completions = ["42", "The answer is 42.", "41", "no idea", "42 or 41, hmm: 41"]
    assert bench.arithmetic_reward(completions=completions, answer=["42"] * 5, prompts=[""] * 5) == \
        [1.0, 1.0, 0.0, 0.0, 0.0]


def curve(*points: tuple[float, float]) -> list[dict]:
    return [{"round": i, "seconds": s, "accuracy": a} for i, (s, a) in enumerate(points)]


def test_time_to_reach_and_accuracy_at(bench):
    rising = curve((0.0, 0.1), (10.0, 0.3), (20.0, 0.45), (30.0, 0.5))
    assert bench.time_to_reach(rising, 0.4) == 20.0
    assert bench.time_to_reach(rising, 0.45) == 20.0  # at least the target
    assert bench.time_to_reach(rising, 0.6) is None
    assert bench.time_to_reach(curve((0.0, 0.5), (10.0, 0.3)), 0.4) == 0.0  # already there before training
    assert bench.accuracy_at(rising, 25.0) == 0.45 and bench.accuracy_at(rising, 5.0) == 0.1

    fast = curve((0.0, 0.1), (5.0, 0.5), (9.0, 0.6))
    figures = bench.derived({"alignpipe": {"points": fast}, "trl": {"points": rising}}, 0.4)
    assert figures["seconds_to_target"] == {"alignpipe": 5.0, "trl": 20.0}
    assert figures["alignpipe_seconds_to_trl_final"] == 5.0 and figures["alignpipe_time_share_of_trl"] == 5 / 30
    assert figures["equal_wall_seconds"] == 9.0
    assert figures["accuracy_at_equal_wall"] == {"alignpipe": 0.6, "trl": 0.1}  # trl: still its round 0
