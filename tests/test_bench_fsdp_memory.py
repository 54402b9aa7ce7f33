"""The FSDP memory benchmark (benchmarks/fsdp_memory.py) end to end on the tiny model: each launch reports both
processes, and FSDP trains to the loss data-parallel training reaches (the same round, sharded). Asserts nothing
about memory or time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "fsdp_memory.py"
PAIRS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl"


def test_data_parallel_and_fsdp_rounds_report_both_processes(tiny_model_path, tmp_path):
    if not PAIRS.is_file():
        pytest.skip("shared/data/hh-rlhf-harmless is not beside the repository")
    out = tmp_path / "fsdp-memory.json"
    run = subprocess.run([sys.executable, str(BENCH), "--model", str(tiny_model_path), "--pairs", "4",
                          "--batch-size", "2", "--configs", "data-parallel", "fsdp-full-shard", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    # the workers' own lines first: torchrun's failure summary fills the end of stderr
    clues = [line for line in run.stderr.splitlines() if any(k in line for k in ("terminate", "what()", "Error", "rror:"))]
    assert run.returncode == 0, "\n".join(clues[:40]) + "\n" + run.stderr[-2000:]
    results = json.loads(out.read_text())
    assert [r["config"] for r in results] == ["data-parallel", "fsdp-full-shard"]
    for result in results:
        assert sorted(r["rank"] for r in result["ranks"]) == [0, 1]
        assert all(r["peak_rss_mb"] >= r["training_mb"] > 0 for r in result["ranks"])
    losses = {r["loss"] for result in results for r in result["ranks"]}
    assert max(losses) - min(losses) < 1e-5, losses
