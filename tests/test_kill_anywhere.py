"""Kill anywhere: a run killed with SIGKILL at random points of every stage, and started again with the same
command until it finishes, ends with the same data files, row for row, and the same summary as a run that
was never killed (issue 12). The points come from `alignpipe.killpoints`: the uninterrupted run traces
every point it passes; a seeded draw picks points from every stage; the killed run fires each once."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from tiny import digit_prompts

# Wall time and memory differ between any two runs, killed or not; everything else must be equal.
VOLATILE = {"stage_seconds", "stage_peak_rss_mb", "peak_rss_mb", "step_time_s", "tokens_per_s"}

# What a draw must cover, by a test on the point's name: (label, test); then more points at random.
STAGES = [
    ("held-out eval before", lambda p: p.startswith("heldout-before/generate:")),
    ("mid-sampling", lambda p: "sampling" in p and "/generate:" in p),
    ("sampling shard done", lambda p: "/shard:" in p),
    ("mid-judging", lambda p: "/judge:" in p),
    ("a Parquet write", lambda p: "/write:" in p and p.endswith(".parquet")),
    ("between data and stamp", lambda p: "/stamp:" in p),
    ("mid-training", lambda p: "/train:" in p),
    ("checkpoint save", lambda p: "/checkpoint:" in p or p.endswith("checkpoint.fingerprint")),
    ("held-out eval after", lambda p: p.startswith("heldout-after/")),
    ("final model save", lambda p: "final_model" in p),
]
POINTS = 20


def _recipe(tmp_path: Path, model: Path) -> Path:
    prompts = digit_prompts(tmp_path / "prompts.jsonl", 40)
    recipe = {
        "name": "killed", "model": str(model), "rounds": 2, "seed": 3,
        "task": {"kind": "file", "path": str(prompts), "heldout_fraction": 0.25},
        # 4 prompts per sampling shard (4 * batch_size rows / 4 samples): two shards a round
        "synthesis": {"prompts_per_round": 8, "samples_per_prompt": 4, "max_new_tokens": 6, "temperature": 1.0,
                      "batch_size": 4},
        # the policy judging its own samples: a judge whose answers are remembered as they come
        "evaluation": {"judge": "pointwise", "model": "policy", "verdict": "logprobs"},
        "optimization": {"objectives": [{"name": "dpo"}, {"name": "sft", "weight": 0.5}], "batch_size": 4,
                         "adapter": {"r": 4, "alpha": 8}, "precision": "fp32", "max_length": 64},
        "heldout": {"n": 8, "max_new_tokens": 6, "batch_size": 4},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(recipe: Path, output_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alignpipe.cli", "run", str(recipe), "--set",
                           f"output_dir={output_dir}"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ALIGNPIPE_THREADS": "1", **env})


def _draw(trace: list[str], seed: int) -> list[str]:
    """POINTS distinct points of the trace: one at random from every stage of STAGES, the rest at random;
    in the order the uninterrupted run passed them."""
    first = {}
    for i, point in enumerate(trace):
        first.setdefault(point, i)
    rng = random.Random(seed)
    chosen: set[str] = set()
    for label, test in STAGES:
        matching = sorted(p for p in first if test(p))
        assert matching, f"the trace has no point for {label!r}"
        chosen.add(rng.choice(matching))
    rest = sorted(set(first) - chosen)
    chosen.update(rng.sample(rest, POINTS - len(chosen)))
    return sorted(chosen, key=first.__getitem__)


def _without_volatile(obj, run_dir: Path):
    if isinstance(obj, dict):
        return {k: _without_volatile(v, run_dir) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_without_volatile(v, run_dir) for v in obj]
    if isinstance(obj, str):
        return obj.replace(str(run_dir.resolve()), "RUN")
    return obj


def _data_files(run_dir: Path) -> dict[str, list[dict]]:
    return {str(p.relative_to(run_dir)): pq.read_table(p).to_pylist() for p in sorted(run_dir.rglob("*.parquet"))
            if not p.name.startswith(".")}


def _judge_store(run_dir: Path) -> dict[str, list[str]]:
    """Every judgment store line's key, per file: a key twice would be one question asked twice."""
    return {str(p.relative_to(run_dir)): [json.loads(line)["key"] for line in p.read_text().splitlines()]
            for p in sorted(run_dir.rglob("judge-cache/*.jsonl"))}


def test_a_run_killed_at_20_points_equals_the_uninterrupted_run(tmp_path, tiny_model_path):
    recipe = _recipe(tmp_path, tiny_model_path)
    trace_file = tmp_path / "trace.txt"
    whole = _run(recipe, tmp_path / "whole", {"ALIGNPIPE_KILL_TRACE": str(trace_file)})
    assert whole.returncode == 0, whole.stderr[-3000:]
    points = _draw(trace_file.read_text().splitlines(), seed=12)

    plan, fired = tmp_path / "plan.json", tmp_path / "fired.txt"
    plan.write_text(json.dumps({"kill": points, "fired": str(fired)}))
    kills = 0
    for _attempt in range(len(points) + 2):
        result = _run(recipe, tmp_path / "killed", {"ALIGNPIPE_KILL_PLAN": str(plan)})
        if result.returncode == 0:
            break
        assert result.returncode == -9, result.stderr[-3000:]  # killed by the plan, not failed
        kills += 1
    assert result.returncode == 0 and kills == len(points) == POINTS
    assert fired.read_text().splitlines() == points  # each killed the run once, in trace order

    a, b = tmp_path / "whole" / "killed", tmp_path / "killed" / "killed"
    assert _data_files(b) == _data_files(a)  # same files, same rows, same order
    summary_a = json.loads((a / "summary.json").read_text())
    summary_b = json.loads((b / "summary.json").read_text())
    assert _without_volatile(summary_b, b) == _without_volatile(summary_a, a)
    assert sum(r["examples"] for r in summary_a["rounds"]) > 0 and summary_a["rounds"][-1]["train"]["steps"] > 0
    # no judgment asked twice across all the restarts, and the same answers as the uninterrupted run
    stores_a, stores_b = _judge_store(a), _judge_store(b)
    assert stores_a.keys() == stores_b.keys() and stores_a
    for name, keys in stores_b.items():
        assert not [k for k, n in Counter(keys).items() if n > 1], name
        assert sorted(keys) == sorted(stores_a[name])
    assert not [p for p in b.rglob(".*tmp*")]  # what the killed writes left behind was removed


def test_a_torn_or_stale_shard_is_redone_never_read(tmp_path, tiny_model_path):
    """A sampling shard cut short on disk, then one holding another config's rows under that config's stamp,
    is sampled again: the run ends with the rows of an undamaged run."""
    import shutil

    recipe = _recipe(tmp_path, tiny_model_path)
    whole = _run(recipe, tmp_path / "out", {})
    assert whole.returncode == 0, whole.stderr[-3000:]
    run_dir = tmp_path / "out" / "killed"
    expected = _data_files(run_dir)
    shard = run_dir / "round-01" / "candidates-shards" / "00001.parquet"
    for damage in ("torn", "stale"):
        if damage == "torn":
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        else:
            shutil.copy(run_dir / "round-00" / "candidates-shards" / "00000.parquet", shard)
            shard.with_name(shard.name + ".fingerprint").write_text("a config that is not this one")
        for name in ("candidates.parquet", "candidates.parquet.fingerprint", "metrics.json"):
            (run_dir / "round-01" / name).unlink()  # the round is unfinished from the shards on
        (run_dir / "summary.json").unlink()
        again = _run(recipe, tmp_path / "out", {})
        assert again.returncode == 0, again.stderr[-3000:]
        assert _data_files(run_dir) == expected, damage
        if damage == "torn":
            assert "00001.parquet cannot be read" in again.stdout + again.stderr


def test_a_run_killed_mid_judging_asks_only_the_rest(tmp_path):
    """9 of 10 chunks judged, then SIGKILL: the rerun asks the judge for the last chunk only (a count of calls)."""
    script = tmp_path / "judge_run.py"
    script.write_text('''
import json, sys
from alignpipe.evaluation.judgment_cache import CachedJudge, JudgmentStore
from alignpipe.records import Candidate, Judgment, Prompt

class Counting:
    name = "counting"
    def __init__(self):
        self.calls = 0
    def score(self, items):
        self.calls += len(items)
        return [Judgment(prompt_id=p.id, candidate_ids=[c.id], judge=self.name,
                         scores={"length": float(len(c.completion))}) for p, c in items]

judge = Counting()
cached = CachedJudge(judge, JudgmentStore(sys.argv[1]), chunk_size=100)
prompt = Prompt(id="p", prompt="say something")
items = [(prompt, Candidate(prompt_id="p", id=f"p/{i}", completion="x" * i)) for i in range(1000)]
out = cached.score(items)
assert [j.scores["length"] for j in out] == [float(i) for i in range(1000)]
print(json.dumps({"judge_calls": judge.calls, "answered_from_store": cached.hits}))
''')
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"kill": ["judge:counting:score:8"], "fired": str(tmp_path / "fired")}))
    store = tmp_path / "store"
    killed = subprocess.run([sys.executable, str(script), str(store)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "ALIGNPIPE_KILL_PLAN": str(plan)})
    assert killed.returncode == -9, killed.stderr
    assert len((store / "counting.jsonl").read_text().splitlines()) == 900
    again = subprocess.run([sys.executable, str(script), str(store)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"judge_calls": 100, "answered_from_store": 900}
