"""The command line: `alignpipe run [RECIPE]`, `alignpipe recipes`, `alignpipe objectives`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.table import Table

from alignpipe import AlignpipeError

app = typer.Typer(add_completion=False, no_args_is_help=False, help="The alignment data pipeline.")
console = Console()
RECIPES = Path(__file__).parent / "recipes"


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise AlignpipeError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


@app.command()
def run(
    recipe: str | None = typer.Argument(None, help="Recipe YAML, or the name of a built-in recipe. "
                                           "Default: the quickstart on the embedded model."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key, e.g. --set rounds=2"),
    output_dir: str | None = typer.Option(None, help="Where runs/<name>/ goes (default: ./runs)"),
) -> None:
    """Run the closed loop: R rounds of synthesis -> evaluation -> instantiation -> optimization."""
    from alignpipe.config import load_recipe
    from alignpipe.loop import run as run_loop

    overrides = _overrides(set_)
    if output_dir:
        overrides["output_dir"] = output_dir
    cfg = load_recipe(recipe, overrides)
    summary = run_loop(cfg, console)
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    table = Table(title=f"{summary['name']}: held-out accuracy (greedy)")
    for col in ("", "accuracy", "n"):
        table.add_column(col)
    table.add_row("before", f"{summary['before']['accuracy']:.1%}", str(summary["before"]["n"]))
    table.add_row("after", f"{summary['after']['accuracy']:.1%}", str(summary["after"]["n"]))
    table.add_row("difference", f"{summary['difference']:+.1%} "
                  f"[{summary['ci95_low']:+.1%}, {summary['ci95_high']:+.1%}] 95% CI", "")
    console.print(table)
    rounds = Table(title="rounds")
    for col in ("round", "sample reward", "examples", "all tied", "loss", "steps"):
        rounds.add_column(col)
    for r in summary["rounds"]:
        t = r.get("train", {})
        rounds.add_row(str(r["round"]), f"{r['sample_reward']:.3f}", str(r["examples"]), str(r["skipped_uniform"]),
                       f"{t.get('loss', float('nan')):.4f}", str(t.get("steps", 0)))
    console.print(rounds)
    console.print(f"final model: {summary['final_model']}")


@app.command()
def recipes() -> None:
    """List the built-in recipes."""
    for path in sorted(RECIPES.glob("*.yaml")):
        first = path.read_text().splitlines()[0].lstrip("# ")
        console.print(f"[bold]{path.stem}[/]: {first}")


@app.command()
def objectives(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
    markdown: bool = typer.Option(False, "--markdown", help="Print the reference page docs/objectives.md"),
) -> None:
    """List every registered objective: family, instance type, inputs, reference needs, defaults, arXiv id."""
    from alignpipe.optimization.objectives import OBJECTIVES, objectives_markdown

    rows = [spec.describe() for spec in OBJECTIVES.values()]
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    if markdown:
        print(objectives_markdown(), end="")
        return
    table = Table()
    for col in ("name", "family", "instances", "reference", "inputs", "defaults", "arXiv"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["family"], ",".join(r["instances"]), r["reference"], ", ".join(r["inputs"]),
                      ", ".join(f"{k}={v}" for k, v in r["defaults"].items()), r["arxiv"])
    console.print(table)


from alignpipe.evaluation.judge_eval_cli import judge_eval  # noqa: E402

app.command("judge-eval", help="Measure judges against human-labelled pairs.")(judge_eval)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except AlignpipeError as exc:
        Console(stderr=True).print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted: run the same command again to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
