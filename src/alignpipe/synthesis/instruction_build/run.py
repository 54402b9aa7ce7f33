"""`run_build(recipe)`: run a build recipe and write its dataset to `output_dir/name/`.

Files (each written to a temporary name, then renamed):

- `instructions.jsonl`: the dataset, one chat `messages` row a line (`{"id", "messages": [user, assistant],
  "meta"}`), read back by the instruction loader (`task: {kind: instructions, path: ...}`);
- `summary.json`: the counts (generated, accepted, rejected per reason, dropped responses, kept rows, calls,
  seconds) that the table printed at the end shows;
- `decisions.jsonl`: every parsed (Self-Instruct) or evolved (Evol-Instruct) instruction and its fate;
- `config.yaml`: the resolved recipe.

A rerun never mixes outputs: when the directory already holds any of these files, the build refuses to start
(naming the way out) unless `overwrite: true`, which deletes them first and writes a fresh set. There is no
resuming: a killed build leaves no partial files behind, and starts over.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from alignpipe import AlignpipeError
from alignpipe.synthesis.generators import Generator, build_generator
from alignpipe.synthesis.instruction_build.common import SeedTask, load_seed_tasks
from alignpipe.synthesis.instruction_build.config import BuildRecipe

OUTPUTS = ("instructions.jsonl", "summary.json", "decisions.jsonl", "config.yaml")


def prepare_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse a directory holding an earlier build (unless `overwrite`: then its files are deleted)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise AlignpipeError(f"{run_dir}: exists and is not a directory")
    present = [name for name in OUTPUTS if (run_dir / name).exists()]
    if any(run_dir.glob("round-*")):
        raise AlignpipeError(f"{run_dir} holds a training run (round-* directories); give the build another name "
                             f"(--set name=NEW)")
    if present and not overwrite:
        raise AlignpipeError(f"{run_dir} already holds a build ({', '.join(present)}); a rerun does not mix with "
                             f"it: remove it, run under a new name (--set name=NEW) or replace it "
                             f"(--set overwrite=true)")
    for name in present:
        (run_dir / name).unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def make_generator(recipe: BuildRecipe) -> Generator:
    """The recipe's generator: its model in this process (transformers), or a server (openai)."""
    g = recipe.generator
    if g.backend == "openai":
        return build_generator("openai", base_url=g.base_url, model=recipe.model, api_key_env=g.api_key_env,
                               concurrency=g.concurrency)
    from alignpipe.models import resolve_model_path

    return build_generator("transformers", model=str(resolve_model_path(recipe.model)), batch_size=g.batch_size)


def run_build(recipe: BuildRecipe, console: Console | None = None, generator: Generator | None = None,
              seeds: list[SeedTask] | None = None) -> dict[str, Any]:
    """Run `recipe` (a Self-Instruct or Evol-Instruct build), write its files, print its table; returns the
    summary. `generator` and `seeds` replace the recipe's own (tests, or a caller holding a model already)."""
    console = console or Console()
    run_dir = Path(recipe.output_dir) / recipe.name
    prepare_dir(run_dir, recipe.overwrite)
    started = time.monotonic()
    seeds = load_seed_tasks(recipe.seed_tasks) if seeds is None else seeds
    if generator is None:
        generator = make_generator(recipe)
    loaded = time.monotonic()
    if recipe.build == "self_instruct":
        from alignpipe.synthesis.instruction_build.self_instruct import self_instruct

        result = self_instruct(generator, recipe, seeds, console.print)
    else:
        from alignpipe.synthesis.instruction_build.evol_instruct import evol_instruct

        result = evol_instruct(generator, recipe, seeds, console.print)
    summary = {"name": recipe.name, "model": recipe.model or "embedded", "output": str(run_dir / OUTPUTS[0]),
               **result.summary}
    summary["seconds"] = {"load": round(loaded - started, 1), **summary.get("seconds", {}),
                          "total": round(time.monotonic() - started, 1)}
    _write(run_dir / "config.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    _write(run_dir / "decisions.jsonl", _jsonl(result.decisions))
    _write(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    _write(run_dir / "instructions.jsonl", _jsonl(result.rows))
    print_summary(summary, console)
    return summary


def print_summary(summary: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{summary['name']}: {summary['build'].replace('_', '-')} build")
    table.add_column("")
    table.add_column("count", justify="right")
    table.add_row("generated", str(summary["generated"]))
    for reason, n in summary["rejected"].items():
        table.add_row(f"  rejected: {reason}", str(n))
    table.add_row("accepted", str(summary["accepted"]))
    if "surplus" in summary:
        table.add_row("  past the target", str(summary["surplus"]))
        for reason, n in summary["responses_dropped"].items():
            table.add_row(f"  response {reason}", str(n))
    if "seeds_in_dataset" in summary:
        table.add_row("seed rows", str(summary["seeds_in_dataset"]))
    table.add_row("[bold]rows written[/]", f"[bold]{summary['kept']}[/]")
    table.add_row("calls", ", ".join(f"{k} {v}" for k, v in summary["calls"].items()))
    table.add_row("seconds", ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()))
    console.print(table)
    console.print(f"dataset: {summary['output']}")
