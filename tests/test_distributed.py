"""Several processes on one run (issue 14): `alignpipe run --num-processes 2` (accelerate's launcher, gloo on
this CPU) writes the run directory one process writes, row for row, and a final adapter within 1e-4 of it;
a killed two-process run resumes; bad launches fail with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import digit_prompts

from alignpipe import distributed
from alignpipe.launch import launch_command, strip_own_options


def _recipe(tmp_path: Path, model: Path, **changes) -> Path:
    prompts = digit_prompts(tmp_path / "prompts.jsonl", 60)
    recipe = {
        "name": "dp", "model": str(model), "rounds": 2, "seed": 5,
        "task": {"kind": "file", "path": str(prompts), "heldout_fraction": 0.2},
        # 4 prompts per sampling shard (4 * batch_size rows / 4 samples): shards of 4, 4, 4 and 1 prompts a
        # round, so both processes sample and judge; the longer sample is preferred, so nearly every prompt gives
        # a pair, and 13 pairs make batches of 4, 4, 4 and 1 (one process runs the last at weight 0)
        "synthesis": {"prompts_per_round": 13, "samples_per_prompt": 4, "max_new_tokens": 6, "temperature": 1.0,
                      "batch_size": 4},
        "evaluation": {"judge": "longer"},
        "optimization": {"objectives": [{"name": "dpo"}, {"name": "sft", "weight": 0.5}], "batch_size": 4,
                         "adapter": {"r": 4, "alpha": 8}, "precision": "fp32", "max_length": 64,
                         "learning_rate": 1e-3},
        "heldout": {"n": 10, "max_new_tokens": 6, "batch_size": 4},  # three held-out batches: 4, 4, 2
    }
    recipe.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


EXAMPLES = Path(__file__).parents[1] / "examples" / "accelerate"
EXAMPLE_CONFIG = EXAMPLES / "one-node-cpu.yaml"
FSDP_CONFIGS = (EXAMPLES / "fsdp-full-shard.yaml", EXAMPLES / "fsdp-shard-grad-op.yaml")


def _run(recipe: Path, output_dir: Path, processes: int | Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`alignpipe run` on `processes` processes, or as an accelerate config file says (a path)."""
    launch = ["--accelerate-config", str(processes)] if isinstance(processes, Path) else \
        ["--num-processes", str(processes)]
    return subprocess.run([sys.executable, "-m", "alignpipe", "run", str(recipe), "--output-dir", str(output_dir),
                           *launch],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "ALIGNPIPE_THREADS": "1", **(env or {})})


def _rows(run_dir: Path) -> dict[str, list[dict]]:
    return {str(p.relative_to(run_dir)): pq.read_table(p).to_pylist() for p in sorted(run_dir.rglob("*.parquet"))}


def _assert_same_run(one: Path, two: Path) -> None:
    rows_one, rows_two = _rows(one), _rows(two)
    assert rows_one.keys() == rows_two.keys()
    for name in rows_one:
        assert rows_one[name] == rows_two[name], name
    name = "adapter_model.safetensors" if (one / "final_model" / "adapter_model.safetensors").exists() \
        else "model.safetensors"  # full fine-tuning
    a, b = load_file(one / "final_model" / name), load_file(two / "final_model" / name)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    if name.startswith("adapter"):  # and training moved the adapter (B starts at zero): not two untouched adapters
        assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s1["after"] == s2["after"]
    assert [r["examples"] for r in s1["rounds"]] == [r["examples"] for r in s2["rounds"]]
    for r1, r2 in zip(s1["rounds"], s2["rounds"], strict=True):  # the logged loss is the whole batch's
        assert r1["train"]["loss"] == pytest.approx(r2["train"]["loss"], rel=1e-4, abs=1e-5)


def test_two_processes_write_what_one_writes(tmp_path, tiny_model_path):
    """Data-parallel and FSDP (the decoder sharded while training, LoRA) against one process."""
    recipe = _recipe(tmp_path, tiny_model_path)
    single = _run(recipe, tmp_path / "one", 1)
    assert single.returncode == 0, single.stderr[-3000:]
    one = tmp_path / "one" / "dp"
    examples = [r["examples"] for r in json.loads((one / "summary.json").read_text())["rounds"]]
    assert any(n % 4 for n in examples) and min(examples) > 4, examples  # several batches, one split unevenly
    for name, launch in [("two", 2), ("fsdp", FSDP_CONFIGS[0])]:
        double = _run(recipe, tmp_path / name, launch)
        assert double.returncode == 0, double.stderr[-3000:] + double.stdout[-3000:]
        assert "2 processes" in double.stdout
        assert ("FSDP while training" in " ".join(double.stdout.split())) == (name == "fsdp")
        two = tmp_path / name / "dp"
        assert len(list((two / "round-00" / "candidates-shards").glob("*.parquet"))) == 4
        _assert_same_run(one, two)
        # only the main process wrote: no temporary or per-process files were left beside the rows
        assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_fsdp_full_fine_tuning_matches_one_process(tmp_path, tiny_model_path):
    """Full fine-tuning under FSDP's other level (gradients and optimizer state sharded): the trained weights of
    two processes equal one process's, and training moved them."""
    optimization = {"objectives": [{"name": "dpo"}, {"name": "sft", "weight": 0.5}], "batch_size": 4,
                    "adapter": None, "precision": "fp32", "max_length": 64, "learning_rate": 1e-4}
    recipe = _recipe(tmp_path, tiny_model_path, optimization=optimization, rounds=1)
    single = _run(recipe, tmp_path / "one", 1)
    assert single.returncode == 0, single.stderr[-3000:]
    double = _run(recipe, tmp_path / "fsdp", FSDP_CONFIGS[1])
    assert double.returncode == 0, double.stderr[-3000:] + double.stdout[-3000:]
    words = " ".join(double.stdout.split())  # rich wraps the console's lines
    assert "FSDP while training: the decoder layers' gradients and optimizer state sharded" in words
    _assert_same_run(tmp_path / "one" / "dp", tmp_path / "fsdp" / "dp")
    trained = load_file(tmp_path / "fsdp" / "dp" / "final_model" / "model.safetensors")
    start = load_file(tiny_model_path / "model.safetensors")
    assert max((trained[k] - start[k]).abs().max().item() for k in start if "layers" in k) > 1e-5


def test_killed_two_process_run_resumes(tmp_path, tiny_model_path):
    recipe = _recipe(tmp_path, tiny_model_path)
    whole = _run(recipe, tmp_path / "whole", 2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    plan = tmp_path / "plan.json"
    # killed in round 1 after its second sampling shard was written, and (on the rerun) mid-training
    plan.write_text(json.dumps({"kill": ["round-01/train:step1", "round-01/shard:round-01/candidates-shards/1"],
                                "fired": str(tmp_path / "fired.txt")}))
    # the killed run launched as the repository's example accelerate config says (2 CPU processes)
    runs = [_run(recipe, tmp_path / "killed", EXAMPLE_CONFIG, {"ALIGNPIPE_KILL_PLAN": str(plan)}) for _ in range(3)]
    assert [r.returncode != 0 for r in runs] == [True, True, False], [r.stderr[-2000:] for r in runs]
    assert (tmp_path / "fired.txt").read_text().split() == ["round-01/shard:round-01/candidates-shards/1",
                                                            "round-01/train:step1"]
    _assert_same_run(tmp_path / "whole" / "dp", tmp_path / "killed" / "dp")


@pytest.mark.parametrize(("changes", "args", "message"), [
    ({"synthesis": {"prompts_per_round": 2, "samples_per_prompt": 2}}, ["--num-processes", "3"],
     "3 processes for synthesis.prompts_per_round=2"),
    ({}, ["--num-processes", "2", "--accelerate-config", "missing.yaml"], "--accelerate-config missing.yaml: no such file"),
    ({}, ["--accelerate-config", "deepspeed.yaml"], "DEEPSPEED: alignpipe shards with FSDP instead"),
])
def test_bad_launch_fails_with_one_line(tmp_path, tiny_model_path, changes, args, message):
    recipe = _recipe(tmp_path, tiny_model_path, **changes)
    (tmp_path / "deepspeed.yaml").write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n"
                                             "num_processes: 2\n")
    out = subprocess.run([sys.executable, "-m", "alignpipe", "run", str(recipe), "--output-dir", str(tmp_path / "r"),
                          *args], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "ALIGNPIPE_THREADS": "1"})
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors and message in errors[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()


def test_batch_is_shared_with_weights_that_restore_the_batch_mean(monkeypatch):
    """Each process's mean loss times its weight, averaged over processes, is the batch's mean loss."""
    losses = torch.tensor([0.3, 1.2, 0.7, 2.0, 0.1])
    monkeypatch.setenv("WORLD_SIZE", "2")
    parts = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        rows, weight = distributed.local_share(list(range(5)))
        parts.append(losses[rows].mean() * weight)
    assert sum(parts) / 2 == pytest.approx(losses.mean().item())
    monkeypatch.setenv("WORLD_SIZE", "4")  # one row for four processes: three run it at weight 0
    shares = []
    for rank in range(4):
        monkeypatch.setenv("RANK", str(rank))
        shares.append(distributed.local_share([7]))
    assert shares == [([7], 4.0), ([7], 0.0), ([7], 0.0), ([7], 0.0)]


def test_map_chunks_in_one_process_keeps_order():
    seen = []
    out = distributed.map_chunks(list(range(7)), 3, lambda chunk, i: seen.append(i) or [x * 10 for x in chunk])
    assert out == [0, 10, 20, 30, 40, 50, 60] and seen == [0, 1, 2]


def test_launch_command_strips_its_own_options(tmp_path):
    args = ["r.yaml", "--num-processes", "2", "--set", "rounds=1", "--accelerate-config=x.yaml"]
    assert strip_own_options(args) == ["r.yaml", "--set", "rounds=1"]
    cmd = launch_command(2, None, args)
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[-5:] == ["alignpipe", "run", "r.yaml", "--set", "rounds=1"]
    assert 0 < int(cmd[cmd.index("--main_process_port") + 1]) < 65536  # a free port, not torchrun's fixed one
    two_machines = tmp_path / "two.yaml"
    two_machines.write_text("num_machines: 2\nmain_process_port: 29400\n")
    assert "--main_process_port" not in launch_command(2, str(two_machines), ["r.yaml"])  # the config's own
    config = tmp_path / "fsdp.yaml"
    config.write_text("distributed_type: FSDP\n")
    assert launch_command(1, str(config), ["r.yaml"])[3:5] == ["--config_file", str(config)]
