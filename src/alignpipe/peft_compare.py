"""PEFT side by side (issue 13 item 4): one recipe trained with full fine-tuning, LoRA, IA3 and prefix tuning.

Each method runs as its own `alignpipe run` process (`<name>-<method>` under the recipe's output_dir), so that its
peak resident memory is its own and one method's failure does not stop the others. The table gives trainable
parameters, peak RSS, wall time and the held-out metric of each; `<output_dir>/<name>-peft.json` keeps it.

Learning rates differ by method by orders of magnitude (full fine-tuning moves every weight; IA3 and prefix
tuning train a few thousand scales or virtual tokens), so each method gets its own: the usual starting points
(full 2e-5, LoRA the recipe's own, IA3 3e-3, prefix tuning 1e-2), overridable with `--lr METHOD=VALUE`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from alignpipe import AlignpipeError

METHODS = ("full", "lora", "ia3", "prefix_tuning")
DEFAULT_LR = {"full": 2e-5, "ia3": 3e-3, "prefix_tuning": 1e-2}  # lora: the recipe's learning_rate


def method_overrides(method: str, recipe_adapter: dict | None, lr: float) -> dict[str, Any]:
    """The `--set` overrides that turn the recipe into its `method` variant."""
    if method not in METHODS:
        raise AlignpipeError(f"peft-compare: unknown method {method!r}; known: {', '.join(METHODS)}")
    if method == "full":
        adapter = None
    elif method == "lora":
        adapter = {**(recipe_adapter or {}), "method": "lora"}
    else:
        adapter = {"method": method}
    return {"optimization.adapter": adapter, "optimization.learning_rate": lr}


def _row(method: str, run_dir: Path, seconds: float, returncode: int) -> dict[str, Any]:
    summary_file = run_dir / "summary.json"
    if returncode != 0 or not summary_file.is_file():
        return {"method": method, "status": f"failed (exit {returncode})", "seconds": seconds}
    s = json.loads(summary_file.read_text())
    after = s["after"]
    return {"method": method, "status": "ok", "trainable_parameters": s["parameters"]["trainable"],
            "total_parameters": s["parameters"]["total"], "peak_rss_mb": s["peak_rss_mb"], "seconds": seconds,
            "metric": s["heldout_metric"], "before": s["before"], "after": after,
            **{k: s[k] for k in ("difference", "ci95_low", "ci95_high", "loss_difference", "loss_ci95_low",
                                 "loss_ci95_high") if k in s}}


def compare(recipe_ref: str | None, overrides: dict[str, Any], methods: list[str],
            learning_rates: dict[str, float]) -> list[dict[str, Any]]:
    """Run `recipe_ref` once per method, each in its own process; the rows of the table, also written to
    `<output_dir>/<name>-peft.json`."""
    from alignpipe.config import load_recipe

    recipe = load_recipe(recipe_ref, overrides)  # a bad recipe fails here, before any run starts
    rows = []
    for method in methods:
        lr = learning_rates.get(method, DEFAULT_LR.get(method, recipe.optimization.learning_rate))
        adapter = recipe.optimization.adapter.model_dump() if recipe.optimization.adapter else None
        variant = {**overrides, **method_overrides(method, adapter, lr), "name": f"{recipe.name}-{method}"}
        load_recipe(recipe_ref, variant)  # each variant is checked before it starts
        command = [sys.executable, "-m", "alignpipe.cli", "run", *([recipe_ref] if recipe_ref else [])]
        for key, value in variant.items():
            command += ["--set", f"{key}={json.dumps(value)}"]  # JSON is YAML: the child parses it back exactly
        started = time.perf_counter()
        returncode = subprocess.run(command, check=False).returncode
        rows.append(_row(method, Path(recipe.output_dir) / f"{recipe.name}-{method}", time.perf_counter() - started,
                         returncode) | {"learning_rate": lr})
    out = Path(recipe.output_dir) / f"{recipe.name}-peft.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")
    return rows
