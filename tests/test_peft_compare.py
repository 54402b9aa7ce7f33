"""PEFT side by side (issue 13 item 4): the same SFT recipe under full fine-tuning, LoRA, IA3 and prefix tuning,
each in its own `alignpipe run` process, through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml
from test_sft import _instruction_file


def test_peft_compare_runs_every_method_and_tabulates(tmp_path, tiny_model_path):
    data = tmp_path / "instructions.jsonl"
    _instruction_file(data)
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny-sft", "model": str(tiny_model_path), "output_dir": str(tmp_path / "runs"),
        "task": {"kind": "instructions", "path": str(data), "heldout_fraction": 0.2},
        "synthesis": {"source": "gold", "prompts_per_round": 16}, "evaluation": {"judge": "accept"},
        "instantiation": {"kind": "sft"},
        "optimization": {"objectives": [{"name": "sft"}], "batch_size": 4, "learning_rate": 1e-2,
                         "adapter": {"r": 4, "alpha": 8}, "max_length": 128},
        "heldout": {"n": 6}}))
    out = subprocess.run([sys.executable, "-m", "alignpipe.cli", "peft-compare", str(recipe), "--lr", "full=1e-3"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "runs" / "tiny-sft-peft.json").read_text())
    assert [r["method"] for r in rows] == ["full", "lora", "ia3", "prefix_tuning"]
    assert all(r["status"] == "ok" for r in rows), rows
    by = {r["method"]: r for r in rows}
    total = by["full"]["total_parameters"]
    assert by["full"]["trainable_parameters"] == total and by["full"]["learning_rate"] == 1e-3
    # every adapter trains a small part; IA3 (a scale per key/value/MLP channel) the least
    assert by["ia3"]["trainable_parameters"] < by["lora"]["trainable_parameters"] < total
    assert 0 < by["prefix_tuning"]["trainable_parameters"] < total
    for r in rows:
        assert r["metric"] == "perplexity" and r["before"]["loss"] > 0 and r["peak_rss_mb"] > 0
        assert r["after"]["loss"] != r["before"]["loss"]  # each method moved the model
        assert (tmp_path / "runs" / f"tiny-sft-{r['method']}" / "final_model").is_dir()
    assert "PEFT side by side" in out.stdout and "prefix_tuning" in out.stdout
