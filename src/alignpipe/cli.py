"""The command line: `alignpipe run`, `peft-compare`, `recipes`, `objectives`, `train-reward-model`, `judge-eval`, `report`,
`label`, `label-agreement`."""

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


HEAVY = ("run", "judge-eval", "train-reward-model")  # commands that run a model


@app.callback()
def _setup(ctx: typer.Context) -> None:
    """glibc's allocator set for training (allocator.py); torch threads = the cores this process may use (affinity,
    cgroup quota, busy cores) shared among the processes of a multi-process run; ALIGNPIPE_THREADS overrides.
    Under accelerate's launcher, join its process group."""
    if ctx.invoked_subcommand in HEAVY:
        from alignpipe.allocator import configure_allocator

        configure_allocator()  # first: before torch's first allocation (ALIGNPIPE_MALLOC, allocator.py)
        from alignpipe import distributed
        from alignpipe.threads import configure_threads

        configure_threads()
        distributed.init()


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise AlignpipeError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise AlignpipeError(f"--set {key}: not a YAML value: {str(exc).splitlines()[0]}") from None
    return out


@app.command()
def run(
    recipe: str | None = typer.Argument(None, help="Recipe YAML, or the name of a built-in recipe. "
                                           "Default: the quickstart on the embedded model."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key, e.g. --set rounds=2"),
    output_dir: str | None = typer.Option(None, help="Where runs/<name>/ goes (default: ./runs)"),
    num_processes: int = typer.Option(1, "--num-processes", min=1,
                                      help="Run on N processes through `accelerate launch` (data-parallel)"),
    accelerate_config: str | None = typer.Option(None, "--accelerate-config",
                                                 help="accelerate config file for --num-processes"),
) -> None:
    """Run the closed loop: R rounds of synthesis -> evaluation -> instantiation -> optimization (or, for a recipe
    with a top-level `build:` key, build an instruction dataset: self-instruct, evol-instruct)."""
    from alignpipe import distributed
    from alignpipe.config import load_recipe

    launching = (num_processes > 1 or accelerate_config is not None) and distributed.world_size() == 1
    from alignpipe.synthesis.instruction_build.config import build_recipe_path, load_build_recipe

    overrides = _overrides(set_)
    if output_dir:
        overrides["output_dir"] = output_dir
    build = build_recipe_path(recipe)
    if build is not None:
        from alignpipe.synthesis.instruction_build.run import run_build

        if launching:
            raise AlignpipeError("--num-processes: an instruction-building recipe runs in one process")

        run_build(load_build_recipe(build, overrides), console)
        return
    cfg = load_recipe(recipe, overrides)
    if launching:  # the same command again under accelerate's launcher, once the recipe is known good
        from alignpipe.launch import check_processes, relaunch

        check_processes(cfg, num_processes)
        sys.exit(relaunch(num_processes, accelerate_config, sys.argv[sys.argv.index("run") + 1 :]))
    from alignpipe.loop import (
        run as run_loop,  # after the recipe: a bad one fails without importing transformers
    )

    summary = run_loop(cfg, console if distributed.is_main() else Console(quiet=True))
    if distributed.is_main():
        _print_summary(summary)


@app.command("peft-compare")
def peft_compare(
    recipe: str | None = typer.Argument(None, help="Recipe YAML or built-in name (e.g. sft-gsm8k)"),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key, e.g. --set task.path=data.jsonl"),
    method: list[str] = typer.Option([], "--method", help="full, lora, ia3, prefix_tuning (repeatable; default all)"),
    lr: list[str] = typer.Option([], "--lr", help="A method's learning rate, e.g. --lr ia3=1e-3"),
) -> None:
    """The same recipe with full fine-tuning, LoRA, IA3 and prefix tuning, each in its own process: trainable
    parameters, peak memory, wall time and the held-out metric side by side."""
    from alignpipe.peft_compare import METHODS, compare

    rates = {}
    for item in lr:
        name, _, value = item.partition("=")
        try:
            rates[name] = float(value)
        except ValueError:
            raise AlignpipeError(f"--lr expects METHOD=NUMBER, got {item!r}") from None
    rows = compare(recipe, _overrides(set_), method or list(METHODS), rates)
    table = Table(title="PEFT side by side")
    for col in ("method", "trainable params", "share", "lr", "peak RSS", "wall time", "held-out before", "after"):
        table.add_column(col)
    for r in rows:
        if r["status"] != "ok":
            table.add_row(r["method"], r["status"], "", f"{r['learning_rate']:g}", "", f"{r['seconds']:.0f} s", "", "")
            continue
        show = (lambda m: f"loss {m['loss']:.4f}") if r["metric"] == "perplexity" else (lambda m: _pct(m["accuracy"]))
        table.add_row(r["method"], f"{r['trainable_parameters']:,}",
                      f"{r['trainable_parameters'] / r['total_parameters']:.3%}", f"{r['learning_rate']:g}",
                      f"{r['peak_rss_mb'] / 1024:.2f} GB", f"{r['seconds']:.0f} s", show(r["before"]), show(r["after"]))
    console.print(table)


def _pct(x: float | None, sign: str = "") -> str:
    return "-" if x is None or x != x else f"{x:{sign}.1%}"


def _print_summary(summary: dict) -> None:
    metric = "pair preference (held-out human pairs)" if summary["heldout_metric"] == "pair_preference" \
        else "accuracy (greedy)"
    if summary["before"].get("perplexity") is not None:  # instruction data: the held-out completion loss
        table = Table(title=f"{summary['name']}: held-out completion loss (mean NLL per assistant token)")
        for col in ("", "loss", "perplexity", "n"):
            table.add_column(col)
        for side in ("before", "after"):
            table.add_row(side, f"{summary[side]['loss']:.4f}", f"{summary[side]['perplexity']:.2f}",
                          str(summary[side]["n"]))
        if "loss_difference" in summary:
            table.add_row("difference", f"{summary['loss_difference']:+.4f} [{summary['loss_ci95_low']:+.4f}, "
                          f"{summary['loss_ci95_high']:+.4f}] 95% CI", "", "")
        console.print(table)
    elif summary["before"]["accuracy"] is not None:  # None: a chat task without human pairs (win rate only)
        table = Table(title=f"{summary['name']}: held-out {metric}")
        for col in ("", "value", "n"):
            table.add_column(col)
        table.add_row("before", _pct(summary["before"]["accuracy"]), str(summary["before"]["n"]))
        table.add_row("after", _pct(summary["after"]["accuracy"]), str(summary["after"]["n"]))
        if "difference" in summary:
            table.add_row("difference", f"{_pct(summary['difference'], '+')} [{_pct(summary['ci95_low'], '+')}, "
                          f"{_pct(summary['ci95_high'], '+')}] 95% CI", "")
        console.print(table)
    if "heldout_winrate" in summary:
        w = summary["heldout_winrate"]
        table = Table(title=f"{summary['name']}: final policy vs round 0 on held-out prompts, judged by {w['judge']}")
        for col in ("win rate", "95% CI", "LC win rate", "ties", "n", "excluded"):
            table.add_column(col)
        table.add_row(_pct(w["win_rate"]), f"[{_pct(w['ci95_low'])}, {_pct(w['ci95_high'])}]", _pct(w["lc_win_rate"]),
                      str(w["ties"]), str(w["n"]), ", ".join(f"{k}: {v}" for k, v in w["excluded"].items()) or "0")
        console.print(table)
    if summary.get("protocols"):
        table = Table(title=f"{summary['name']}: evaluation protocols (round 0 -> final policy)")
        for col in ("protocol", "measure", "before", "after", "n"):
            table.add_column(col)
        for name, sides in summary["protocols"].items():
            measures = ("prompt_accuracy", "instruction_accuracy") if name == "ifeval" else ("refusal_rate",)
            for m in measures:
                table.add_row(name, m, _pct(sides["before"][m]), _pct(sides["after"][m]), str(sides["after"]["n"]))
        console.print(table)
    rounds = Table(title="rounds")
    for col in ("round", "sample reward", "examples", "all tied", "judge not ok", "both-order cons.", "loss", "steps"):
        rounds.add_column(col)
    for r in summary["rounds"]:
        t, judge = r.get("train", {}), r.get("judge", {})
        not_ok = r.get("judgments_not_ok") or {}
        not_ok = sum(not_ok.values()) if isinstance(not_ok, dict) else not_ok
        rounds.add_row(str(r["round"]), f"{r['sample_reward']:.3f}", str(r["examples"]), str(r["skipped_uniform"]),
                       str(not_ok), _pct(judge.get("pairwise", {}).get("both_order_consistency")),
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


@app.command("train-reward-model")
def train_reward_model(
    pairs: str = typer.Option(..., "--pairs", help="Human-labelled pairs: jsonl/parquet, hh-rlhf or TRL "
                              "prompt/chosen/rejected format"),
    output: str = typer.Option(..., "--output", help="Directory to write the reward model to (load it with the "
                               "judge spec reward-model:DIR)"),
    backbone: str | None = typer.Option(None, "--backbone", help="Local HF model directory (default: the "
                                        "embedded model)"),
    method: str = typer.Option("head", "--method", help="'head' (frozen backbone, linear Bradley-Terry head) or "
                               "'lora' (LoRA on the backbone and the head, trained jointly; merged when saved)"),
    train_fraction: float = typer.Option(0.6, "--train-fraction", help="Share of the seeded shuffle used for "
                                         "training; the rest is the test set"),
    seed: int = typer.Option(0, "--seed", help="Seed of the split shuffle and of training"),
    max_length: int = typer.Option(128, "--max-length", min=8, help="Tokens per sequence (truncated on the left)"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sequences (head) or pairs (lora) per batch"),
    layers: str = typer.Option("all", "--layers", help="Decoder layers kept: 'all', N, or N,M,... (head: "
                               "candidates chosen on an inner holdout of the training pairs)"),
    l2: float | None = typer.Option(None, "--l2", help="Head L2 penalty (default: chosen on an inner holdout)"),
    center: float = typer.Option(0.0, "--center", help="Reward-centering coefficient"),
    epochs: int = typer.Option(2, "--epochs", min=1, help="LoRA: passes over the training pairs"),
    lr: float = typer.Option(1e-4, "--lr", help="LoRA: learning rate of the adapter (the head's is 10x)"),
    lora_r: int = typer.Option(8, "--lora-r", min=1, help="LoRA rank (alpha = 2 r)"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Use only the first N pairs of the file"),
    fmt: str = typer.Option("auto", "--format", help="Pairs format: auto, hh or trl"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads"),
    no_cache: bool = typer.Option(False, "--no-cache", help="Head: do not keep features under ~/.cache/alignpipe"),
) -> None:
    """Train a Bradley-Terry reward model on preference pairs; the output directory is a judge
    (reward-model:DIR)."""
    from alignpipe.evaluation.reward_training import train_reward_model_command
    from alignpipe.models import cache_dir

    m = train_reward_model_command(
        pairs, output, backbone=backbone, method=method, train_fraction=train_fraction, seed=seed,
        max_length=max_length, batch_size=batch_size, layers=layers, l2=l2, center_coef=center, limit=limit,
        fmt=fmt, epochs=epochs, lr=lr, lora_r=lora_r, lora_alpha=2 * lora_r,
        feature_cache=None if no_cache else cache_dir() / "rm-features", threads=threads,
    )
    table = Table(title=f"reward model: {m['method']}, {m['layers']} layers")
    for col in ("split", "pairs", "accuracy", "BT loss"):
        table.add_column(col)
    for side in ("train", "test"):
        if m.get(f"{side}_pairs"):
            table.add_row(side, str(m[f"{side}_pairs"]), f"{m[f'{side}_accuracy']:.1%}", f"{m[f'{side}_loss']:.4f}")
    console.print(table)
    console.print(f"{m['total_seconds']:.0f} s; model, metrics.json and split.json in {m['output']} "
                  f"(judge: reward-model:{m['output']})")


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run directories (runs/<name>); several: a comparison"),
    out: Path | None = typer.Option(None, "--out", help="HTML file to write (default: RUN/report.html for one "
                                    "run, compare-<a>-vs-<b>.html beside the first run for several)"),
    as_json: bool = typer.Option(False, "--json", help="Print the report's figures as JSON to stdout instead of "
                                 "writing HTML (with --out: both)"),
) -> None:
    """Write a self-contained HTML report of one run, or a comparison of several (config differences first)."""
    from alignpipe.diagnostics.report import build_report, default_output, render_html, write_html

    data = build_report(runs)
    if as_json:
        print(json.dumps(data, indent=2))
    if out is not None or not as_json:
        path = write_html(render_html(data), out or default_output(runs))
        Console(stderr=as_json).print(f"report: {path}", highlight=False, soft_wrap=True)


@app.command()
def label(
    source: str = typer.Argument(..., help="Pairs file (jsonl/parquet: hh-rlhf or TRL prompt/chosen/rejected) or "
                                 "a run round directory RUN/round-NN"),
    labeller: str = typer.Option(os.environ.get("USER") or "me", "--labeller", help="Your name: labels are "
                                 "judgments of judge 'human:NAME' (default: $USER)"),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="Port on 127.0.0.1 (0: any free port)"),
    out: str | None = typer.Option(None, "--out", help="Labels file (default: PAIRS.labels.NAME.jsonl beside the "
                                   "pairs file, or RUN/round-NN/labels.NAME.jsonl)"),
    seed: int = typer.Option(0, "--seed", help="Seed of the random left/right order of each pair"),
    limit: int | None = typer.Option(None, "--limit", help="Label only the first N pairs"),
    export: str | None = typer.Option(None, "--export", help="Write the labels as a TRL prompt/chosen/rejected "
                                      "jsonl (chosen = your pick; ties and skips dropped) to this file and exit"),
) -> None:
    """Label preference pairs on a local page: two responses side by side in a recorded random order,
    A / B / tie / skip / undo, keyboard shortcuts; a restarted server continues where it stopped."""
    from alignpipe.evaluation.label_server import label_command

    label_command(source, labeller, port=port, out=out, seed=seed, limit=limit, export=export, console=console)


@app.command("label-agreement")
def label_agreement(
    labels: list[str] = typer.Argument(..., help="Labels files written by `alignpipe label`"),
    input_path: str | None = typer.Option(None, "--input", help="The labelled pairs file or round directory: "
                                          "also compare each labels file with its own chosen/rejected labels"),
    json_out: str | None = typer.Option(None, "--json", help="Also write the rows as JSON to this file"),
) -> None:
    """Agreement and Cohen's kappa between labellers, and agreement of each with the dataset's labels."""
    from alignpipe.evaluation.judge_eval import check_output_path
    from alignpipe.evaluation.labelling import agreement_rows
    from alignpipe.records import json_safe, write_json

    if json_out:
        check_output_path(json_out, "--json")
    rows = agreement_rows(labels, input_path)
    table = Table(title="label agreement (items both labelled; skips left out)")
    for col in ("labels", "compared with", "pairs", "agree", "agree (tie = 1/2)", "kappa"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["a"], r["b"], str(r["n"]), _pct(r["agreement"]), _pct(r.get("agreement_tie_half")),
                      "-" if r.get("kappa") is None or r["kappa"] != r["kappa"] else f"{r['kappa']:.3f}")
    console.print(table)
    if json_out:
        write_json(json_out, json_safe(rows))
        console.print(f"wrote {json_out}")


from alignpipe.evaluation.judge_eval_cli import judge_eval  # noqa: E402

app.command("judge-eval", help="Measure judges against human-labelled pairs.")(judge_eval)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import click

    # typer >= 0.20 carries its own copy of click: its usage errors derive from typer.TyperException
    usage_errors = tuple(c for c in (getattr(typer, "TyperException", None), click.ClickException) if c)
    stderr = Console(stderr=True)
    try:
        # standalone_mode=False: a bad option or value comes back as an exception, printed as one line below
        # instead of click's usage text and boxed panel
        code = app(standalone_mode=False)
    except AlignpipeError as exc:
        # markup=False: messages quote recipe values such as "[5, 2]", which rich would read as style tags
        stderr.print(f"error: {exc}", style="red", highlight=False, soft_wrap=True, markup=False)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort, click.exceptions.Abort):
        stderr.print("interrupted: run the same command again to resume")
        sys.exit(130)
    except usage_errors as exc:
        ctx = getattr(exc, "ctx", None)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        stderr.print(f"error: {message} (see `{ctx.command_path if ctx else 'alignpipe'} --help`)", style="red",
                     highlight=False, soft_wrap=True, markup=False)
        sys.exit(getattr(exc, "exit_code", 2))
    if isinstance(code, int):  # --help and other early exits return their exit code
        sys.exit(code)


if __name__ == "__main__":
    main()
