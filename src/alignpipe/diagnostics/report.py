"""The run report: one self-contained HTML page per run, or per comparison of runs.

`build_report` reads run directories only (config.yaml, summary.json, heldout-winrate.json, round-NN/) and
returns every figure as JSON-safe data; `write_report` renders it: for several runs first the keys of their
resolved configs that differ, then the held-out outcome, then one panel per signal with the runs overlaid
(plots.py), then per run the rounds table, what is missing, and example candidates of the last round. The
page loads nothing: no network, no CDN, plots are inline SVG, the style is one small inline <style>.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import yaml

from alignpipe import AlignpipeError, __version__
from alignpipe.diagnostics.plots import lookup, panel_data, panel_svg
from alignpipe.diagnostics.rounds import SOURCES, round_diagnostics, round_index
from alignpipe.instantiation import score_of
from alignpipe.records import Candidate, Judgment, Prompt, json_safe, read_records, write_text_atomic

EXAMPLE_PROMPTS = 3
EXAMPLE_CANDIDATES = 3
CLIP = 600  # characters of a completion shown


def _load_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _load_config(run: Path) -> dict | None:
    try:
        value = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return value if isinstance(value, dict) else None


def round_dirs(run: Path) -> list[Path]:
    return sorted((d for d in run.glob("round-*") if d.is_dir() and round_index(d) is not None), key=round_index)


def check_run(run: Path) -> None:
    """A run directory has a config.yaml or round-NN/ folders; anything else is a user error."""
    if not run.is_dir():
        raise AlignpipeError(f"not a run directory: {run} (no such directory)")
    if not (run / "config.yaml").is_file() and not round_dirs(run):
        raise AlignpipeError(f"not a run directory: {run} (no config.yaml and no round-NN/ folders)")


def load_round_diagnostics(rd: Path, config: dict | None) -> dict[str, Any]:
    """diagnostics.json when it is there and no round file is missing or newer; otherwise recomputed."""
    cached = rd / "diagnostics.json"
    if cached.is_file():
        stamp = cached.stat().st_mtime
        sources = [rd / name for name in SOURCES]
        if all(p.is_file() and p.stat().st_mtime <= stamp for p in sources):
            diag = _load_json(cached)
            if diag is not None:
                return diag
    return round_diagnostics(rd, config)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as dotted keys: {"optimization.objectives.0.beta": 0.1, ...}."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, list) and obj:
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: obj}


def config_diff(configs: list[dict | None]) -> list[dict[str, Any]]:
    """The dotted keys whose values differ between the configs (absent counts as a value), in key order."""
    flat = [flatten(c) if c else {} for c in configs]
    keys = sorted({k for f in flat for k in f})
    missing = object()
    rows = []
    for k in keys:
        values = [f.get(k, missing) for f in flat]
        if any(v != values[0] for v in values[1:]):
            rows.append({"key": k, "values": [None if v is missing else v for v in values],
                         "absent": [v is missing for v in values]})
    return rows


def _outcome(run: Path, summary: dict | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if summary is not None:
        out["metric"] = summary.get("heldout_metric")
        for side in ("before", "after"):
            value = summary.get(side)
            out[side] = value.get("accuracy") if isinstance(value, dict) else None
            out["n"] = value.get("n") if isinstance(value, dict) else out.get("n")
        for k in ("difference", "ci95_low", "ci95_high"):
            out[k] = summary.get(k)
    else:
        out["missing"] = "summary.json"
    winrate = (summary or {}).get("heldout_winrate") or _load_json(run / "heldout-winrate.json")
    if isinstance(winrate, dict):
        out["winrate"] = {k: winrate.get(k) for k in ("win_rate", "ci95_low", "ci95_high", "lc_win_rate", "n",
                                                       "ties", "judge", "both_order_consistency")}
    return out


def _notes(run: Path, rounds: list[Path], config: dict | None, summary: dict | None) -> list[str]:
    """What the page says is missing: the run's own files, round files, rounds never started."""
    notes = []
    if config is None:
        notes.append("no config.yaml (or unreadable): the resolved config is unknown")
    if summary is None:
        notes.append("no summary.json: the run did not finish")
    for i, rd in enumerate(rounds):
        last = i == len(rounds) - 1 and summary is None
        for name in SOURCES:
            if not (rd / name).is_file():
                why = "the run stopped in this round" if last else "deleted or never written"
                notes.append(f"round {round_index(rd)}: no {name} ({why})")
    planned = config.get("rounds") if config else None
    if isinstance(planned, int) and len(rounds) < planned and summary is None:
        done = {round_index(rd) for rd in rounds}
        never = [r for r in range(planned) if r not in done]
        notes.append(f"round(s) {', '.join(map(str, never))} of {planned} never started")
    return notes


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + f"... [{len(text) - n} more characters]"


def example_candidates(rounds: list[Path], dim: str | None) -> dict[str, Any] | None:
    """From the last round with candidates and judgments: a few prompts (those whose scores differ first), each
    with its best, worst and a middle candidate, their scores and judgments."""
    for rd in reversed(rounds):
        try:
            candidates = read_records(rd / "candidates.parquet", Candidate)
            judgments = read_records(rd / "judgments.parquet", Judgment)
        except Exception:  # noqa: BLE001 - a round without readable files has no examples: try the one before
            continue
        try:
            prompts = {p.id: p.prompt for p in read_records(rd / "prompts.parquet", Prompt)}
        except Exception:  # noqa: BLE001
            prompts = {}
        by_cand = {j.candidate_ids[0]: j for j in judgments if len(j.candidate_ids) == 1}
        groups: dict[str, list[dict[str, Any]]] = {}
        for c in candidates:
            j = by_cand.get(c.id)
            groups.setdefault(c.prompt_id, []).append({
                "id": c.id, "completion": _clip(c.completion, CLIP), "tokens": c.num_tokens, "truncated": c.truncated,
                "score": score_of(j, dim) if j is not None and j.status == "ok" else None,
                "status": j.status if j else "missing", "reason": j.reason if j else "no judgment",
                "rationale": _clip(j.rationale, 300) if j else ""})
        order = sorted(groups, key=lambda pid: len({c["score"] for c in groups[pid]}) < 2)  # stable: informative first
        shown = []
        for pid in order[:EXAMPLE_PROMPTS]:
            cands = sorted(groups[pid], key=lambda c: -1e300 if c["score"] is None else c["score"], reverse=True)
            pick = [cands[0], cands[-1], cands[len(cands) // 2]] if len(cands) > 2 else cands
            pick = sorted({c["id"]: c for c in pick}.values(), key=cands.index)[:EXAMPLE_CANDIDATES]  # best first
            shown.append({"prompt_id": pid, "prompt": _clip(prompts.get(pid, pid), CLIP), "candidates": pick})
        return {"round": round_index(rd), "prompts": shown}
    return None


def _run_name(run: Path, all_runs: list[Path]) -> str:
    same = [r for r in all_runs if r.name == run.name]
    return run.name if len(same) == 1 else f"{run.parent.name}/{run.name}"


def build_report(run_dirs: list[Path]) -> dict[str, Any]:
    """Every figure of the report, JSON-safe: per run its outcome, notes, round diagnostics and example
    candidates; the config differences (several runs) and the signal panels over all runs."""
    runs = [Path(r) for r in run_dirs]
    if not runs:
        raise AlignpipeError("report: no run directory given")
    for run in runs:
        check_run(run)
    out_runs = []
    for run in runs:
        config, summary = _load_config(run), _load_json(run / "summary.json")
        rds = round_dirs(run)
        diags = [load_round_diagnostics(rd, config) for rd in rds]
        dim = ((config or {}).get("instantiation") or {}).get("score")
        out_runs.append({"name": _run_name(run, runs), "path": str(run.resolve()), "config": config,
                         "outcome": _outcome(run, summary), "notes": _notes(run, rds, config, summary),
                         "rounds": diags, "examples": example_candidates(rds, dim)})
    return json_safe({
        "alignpipe": __version__,
        "runs": out_runs,
        "config_diff": config_diff([r["config"] for r in out_runs]) if len(out_runs) > 1 else None,
        "panels": panel_data([(r["name"], r["rounds"]) for r in out_runs]),
    })


# ---------------------------------------------------------------- HTML

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1180px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.8em; } h3 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.panels { display: flex; flex-wrap: wrap; gap: 12px; }
figure.panel { margin: 0; border: 1px solid #e3e3e3; padding: 4px; width: 560px; }
figure.panel svg { width: 100%; height: auto; } figcaption { font-weight: 600; font-size: 13px; }
.wide { overflow-x: auto; } .note { color: #8a5300; } ul.missing li { color: #8a1f00; }
table[data-panel=example] td:first-child { white-space: pre-wrap; min-width: 30ch; max-width: 80ch; }
pre { white-space: pre-wrap; background: #f7f7f7; padding: 6px; margin: 0; max-height: 18em; overflow: auto; }
"""

e = html.escape


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict | list):
        return json.dumps(v, sort_keys=True)
    return str(v)


def _table(panel: str, header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{e(_fmt(c))}</td>' if isinstance(c, int | float) and not isinstance(c, bool)
        else f"<td>{e(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return (f'<div class="wide"><table data-panel="{e(panel)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            "</table></div>")


def _ci(v: Any, lo: Any, hi: Any) -> str:
    return "—" if v is None else f"{_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]"


def _outcome_html(runs: list[dict]) -> str:
    rows = []
    for r in runs:
        o, w = r["outcome"], r["outcome"].get("winrate") or {}
        rows.append([r["name"], o.get("metric") or ("no summary.json" if o.get("missing") else "—"), o.get("before"),
                     o.get("after"), _ci(o.get("difference"), o.get("ci95_low"), o.get("ci95_high")), o.get("n"),
                     _ci(w.get("win_rate"), w.get("ci95_low"), w.get("ci95_high")), w.get("judge")])
    return _table("outcome", ["run", "held-out metric", "before", "after", "difference [95% CI, paired]", "n",
                              "win rate vs round 0 [95% CI]", "win-rate judge"], rows)


ROUND_COLUMNS = [("round", "round"), ("candidates", "candidates.count"), ("tokens mean", "candidates.tokens.mean"),
                 ("truncated", "candidates.truncation_rate"), ("distinct-2", "candidates.distinct_2"),
                 ("duplicates", "candidates.duplicate_rate"), ("score mean", "judgments.scores.mean"),
                 ("tie share", "judgments.tie_share"), ("invalid", "judgments.invalid_rate"),
                 ("error", "judgments.error_rate"), ("both-order cons.", "judgments.pairwise.both_order_consistency"),
                 ("score~length (Spearman)", "judgments.length_correlation.spearman"),
                 ("examples", "examples.count"), ("dropped", "examples.dropped.dropped"),
                 ("margin mean", "examples.margin.mean"), ("loss", "training.loss"), ("steps", "training.steps"),
                 ("KL after", "training.kl_ref_after"), ("peak RSS MB", "timing.peak_rss_mb")]


def _run_html(i: int, run: dict) -> str:
    parts = [f'<section class="run" id="run-{i}" data-run="{e(run["name"])}"><h2>{e(run["name"])}</h2>',
             f"<p>{e(run['path'])}</p>"]
    if run["notes"]:
        items = "".join(f"<li>{e(n)}</li>" for n in run["notes"])
        parts.append(f'<h3>Missing</h3><ul class="missing" data-panel="missing-{i}">{items}</ul>')
    rows = [[lookup(d, path) if path != "round" else d.get("round") for _, path in ROUND_COLUMNS]
            for d in run["rounds"]]
    parts.append("<h3>Rounds</h3>" + _table(f"rounds-{i}", [c for c, _ in ROUND_COLUMNS], rows))
    reasons = [[d.get("round"), status, reason, n] for d in run["rounds"]
               for status, by in ((d.get("judgments") or {}).get("reasons") or {}).items() for reason, n in by.items()]
    if reasons:
        parts.append("<h3>Judgments not ok</h3>" + _table(f"not-ok-{i}", ["round", "status", "reason", "count"],
                                                          reasons))
    ex = run["examples"]
    if ex:
        parts.append(f'<h3>Example candidates (round {ex["round"]})</h3><div data-panel="examples-{i}">')
        for p in ex["prompts"]:
            parts.append(f"<h4>prompt {e(p['prompt_id'])}</h4><pre>{e(p['prompt'])}</pre>")
            parts.append(_table("example", ["completion", "score", "judgment", "tokens", "truncated"], [
                [c["completion"], c["score"], c["status"] + (f": {c['reason']}" if c["reason"] else "")
                 + (f" — {c['rationale']}" if c["rationale"] else ""), c["tokens"], c["truncated"]]
                for c in p["candidates"]]))
        parts.append("</div>")
    else:
        parts.append(f'<p class="note" data-panel="examples-{i}">no round with candidates and judgments</p>')
    if run["config"]:
        parts.append(f"<details><summary>config.yaml</summary><pre>{e(yaml.safe_dump(run['config'], sort_keys=False))}"
                     "</pre></details>")
    return "".join(parts) + "</section>"


def render_html(report: dict[str, Any]) -> str:
    """The page for `build_report`'s figures (see the module docstring)."""
    runs = report["runs"]
    title = "alignpipe report: " + " vs ".join(r["name"] for r in runs)
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{e(title)}</h1>"]
    if report["config_diff"] is not None:
        rows = [[d["key"], *("(absent)" if a else v for v, a in zip(d["values"], d["absent"], strict=True))]
                for d in report["config_diff"]]
        parts.append('<section id="config-diff"><h2>What differs in the pipeline (resolved configs)</h2>')
        parts.append(_table("config-diff", ["key", *(r["name"] for r in runs)], rows) if rows
                     else '<p data-panel="config-diff">the resolved configs are identical</p>')
        parts.append("</section>")
    parts.append('<section id="outcome"><h2>Held-out outcome</h2>' + _outcome_html(runs) + "</section>")
    parts.append('<section id="signals"><h2>Signal per round</h2><div class="panels">')
    for p in report["panels"]:
        note = f'<div class="note">{e(p["note"])}</div>' if p["note"] else ""
        parts.append(f'<figure class="panel" id="panel-{e(p["id"])}" data-panel="signal-{e(p["id"])}">'
                     f"<figcaption>{e(p['title'])}</figcaption>{panel_svg(p)}{note}</figure>")
    parts.append("</div></section>")
    parts += [_run_html(i, r) for i, r in enumerate(runs)]
    parts.append(f"<footer><p>written by alignpipe {e(report['alignpipe'])} from the run directories only"
                 "</p></footer></body></html>")
    return "".join(parts) + "\n"


def write_report(run_dirs: list[Path], out: Path) -> Path:
    """Write the HTML report of `run_dirs` to `out` atomically; returns `out`."""
    return write_html(render_html(build_report(run_dirs)), out)


def write_html(page: str, out: Path) -> Path:
    """Write `page` to `out` atomically (a temporary name, then rename); returns `out`."""
    return write_text_atomic(out, page)


def default_output(run_dirs: list[Path]) -> Path:
    """RUN/report.html for one run; beside the first run, compare-<a>-vs-<b>.html for several."""
    runs = [Path(r) for r in run_dirs]
    if len(runs) == 1:
        return runs[0] / "report.html"
    return runs[0].resolve().parent / f"compare-{'-vs-'.join(r.resolve().name for r in runs)}.html"
