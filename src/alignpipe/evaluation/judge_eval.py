"""How good is a judge? Agreement with human preference labels, position consistency, invalid rate,
length bias, length-controlled agreement and throughput: the engine of `alignpipe judge-eval`.

Per judge, over N human-labelled pairs (chosen = the human's pick):

- **pairwise** judges are asked about both orders of every pair, (chosen, rejected) and (rejected, chosen),
  in one batched `compare` call. A pair's verdict follows MT-Bench's conservative rule: the same verdict in
  both orders stands, disagreement is a tie; if either order has no verdict (invalid/error) the pair is
  invalid. `agreement_single` averages the 2N single-order verdicts instead (what one call in one
  random order gets).
- **pointwise** judges score both responses (one `score` call on 2N items); the higher score is preferred,
  equal scores are a tie, and the pair is invalid if either score is. Position consistency is 1 by
  construction (a score does not depend on where a response is shown).

Scores per pair: human-preferred response picked = 1, tie = 0.5, invalid = 0.5 (RewardBench), other = 0.
`agreement` is their mean. `lc_agreement` is the AlpacaEval length-controlled version (length_control.py):
the predicted agreement at zero length difference between chosen and rejected. `longer_rate` is the share
of decisive verdicts (on pairs of unequal length) that picked the longer response; `length_corr` the
correlation of the verdict with the length difference. The `human` reference row shows how often the
human labels themselves picked the longer response. `pairs_per_s` = N / wall time of the judge's calls; it
is left out (`-`) when some items were answered from remembered judgments (`cached_items`: an ensemble
member judged earlier in the run, or a `--cache` directory), since the time then is not the judge's.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from rich.markup import escape

from alignpipe import AlignpipeError
from alignpipe.data.pairs import LabelledPair
from alignpipe.evaluation.ensemble import is_pairwise, main_score, safe_call
from alignpipe.evaluation.length_control import length_bias, length_controlled, preference_value
from alignpipe.records import Judgment, json_safe

_FLIP = {"first": "second", "second": "first", "tie": "tie"}
COLUMNS = [  # (key, header, format)
    ("judge", "judge", "{}"), ("kind", "kind", "{}"), ("n", "pairs", "{}"),
    ("agreement", "agree", "{:.1%}"), ("agreement_single", "1-order", "{:.1%}"),
    ("lc_agreement", "LC agree", "{:.1%}"), ("position_consistency", "pos.cons", "{:.1%}"),
    ("invalid_rate", "invalid", "{:.1%}"), ("tie_rate", "ties", "{:.1%}"), ("longer_rate", "longer", "{:.1%}"),
    ("length_corr", "len.corr", "{:+.2f}"), ("pairs_per_s", "pairs/s", "{:.3g}"),
]


def _ok(j: Judgment) -> bool:
    return j.status == "ok" and j.preference in _FLIP


def _pairwise_verdicts(judge: Any, pairs: list[LabelledPair]) -> dict[str, Any]:
    forward = [(p, c, r) for p, c, r in pairs]
    backward = [(p, r, c) for p, c, r in pairs]
    out = safe_call(judge, "compare", forward + backward)
    n = len(pairs)
    fwd, bwd = out[:n], out[n:]
    verdicts, singles, both_valid, same = [], [], 0, 0
    for a, b in zip(fwd, bwd, strict=True):
        pa = preference_value(a.preference, "ok" if _ok(a) else "invalid")  # preference for chosen
        pb = preference_value(_FLIP.get(b.preference or ""), "ok" if _ok(b) else "invalid")
        singles += [pa, pb]
        if _ok(a) and _ok(b):
            both_valid += 1
            same += a.preference == _FLIP[b.preference]
            verdicts.append(pa if pa == pb else 0.5)
        else:
            verdicts.append(None)
    bad = [j for j in out if not _ok(j)]
    return {"verdicts": verdicts, "singles": singles,
            "position_consistency": same / both_valid if both_valid else math.nan, "consistency_n": both_valid,
            "invalid_rate": len(bad) / len(out) if out else math.nan,
            "errors": sum(j.status == "error" for j in out), "reasons": [j.reason for j in bad[:3]],
            "note": "pairwise: both orders; disagreement = tie, a missing order = invalid"}


def _pointwise_verdicts(judge: Any, pairs: list[LabelledPair]) -> dict[str, Any]:
    items = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    out = safe_call(judge, "score", items)
    n = len(pairs)
    verdicts = []
    for jc, jr in zip(out[:n], out[n:], strict=True):
        sc, sr = main_score(jc), main_score(jr)
        verdicts.append(None if sc is None or sr is None else 1.0 if sc > sr else 0.0 if sc < sr else 0.5)
    bad = [j for j in out if main_score(j) is None]
    return {"verdicts": verdicts, "singles": [0.5 if v is None else v for v in verdicts],
            "position_consistency": 1.0, "consistency_n": n,
            "invalid_rate": len(bad) / len(out) if out else math.nan,
            "errors": sum(j.status == "error" for j in out), "reasons": [j.reason for j in bad[:3]],
            "note": "pointwise: position consistency is 1 by construction; equal scores = tie"}


def _cache_hits(judge: Any) -> int:
    """Items answered from remembered judgments by `judge` or any judge inside it (ensemble members)."""
    inner = [*getattr(judge, "members", []), getattr(judge, "arbiter", None), getattr(judge, "inner", None),
             getattr(judge, "judge", None)]
    return getattr(judge, "hits", 0) + sum(_cache_hits(j) for j in inner if j is not None and j is not judge)


def evaluate_judge(pairs: list[LabelledPair], judge: Any) -> dict[str, Any]:
    """One row of judge-eval for one judge (see the module docstring for the definitions)."""
    hits_before = _cache_hits(judge)
    start = time.perf_counter()
    res = _pairwise_verdicts(judge, pairs) if is_pairwise(judge) else _pointwise_verdicts(judge, pairs)
    seconds = time.perf_counter() - start
    cached = _cache_hits(judge) - hits_before
    prefs = [0.5 if v is None else v for v in res["verdicts"]]
    len_c = [len(c.completion) for _, c, _ in pairs]
    len_r = [len(r.completion) for _, _, r in pairs]
    lc = length_controlled(prefs, len_c, len_r)
    bias = length_bias(prefs, len_c, len_r)
    n = len(pairs)
    return {
        "judge": judge.name, "kind": "pairwise" if is_pairwise(judge) else "pointwise", "n": n,
        "agreement": sum(prefs) / n if n else math.nan,
        "agreement_single": sum(res["singles"]) / len(res["singles"]) if n else math.nan,
        "lc_agreement": lc["lc"], "theta_len": lc["theta_len"],
        "position_consistency": res["position_consistency"], "consistency_n": res["consistency_n"],
        "invalid_rate": res["invalid_rate"], "errors": res["errors"],
        "pair_invalid_rate": sum(v is None for v in res["verdicts"]) / n if n else math.nan,
        "tie_rate": sum(v == 0.5 for v in res["verdicts"]) / n if n else math.nan,
        "longer_rate": bias["longer_rate"], "length_corr": bias["corr"], "n_decisive": bias["n_decisive"],
        "seconds": seconds, "pairs_per_s": n / seconds if seconds > 0 and not cached else math.nan,
        "cached_items": cached,
        "note": res["note"], "sample_reasons": res["reasons"],
    }


def human_reference(pairs: list[LabelledPair]) -> dict[str, Any]:
    """The human labels as a 'judge': how often the preferred response is the longer one."""
    len_c = [len(c.completion) for _, c, _ in pairs]
    len_r = [len(r.completion) for _, _, r in pairs]
    bias = length_bias([1.0] * len(pairs), len_c, len_r)
    return {"judge": "human", "kind": "reference", "n": len(pairs), "agreement": 1.0,
            "longer_rate": bias["longer_rate"], "length_corr": math.nan, "n_decisive": bias["n_decisive"],
            "mean_len_chosen": sum(len_c) / max(1, len(pairs)), "mean_len_rejected": sum(len_r) / max(1, len(pairs)),
            "note": "the human labels; longer_rate = share of pairs where the chosen response is longer"}


def evaluate_judges(pairs: list[LabelledPair], judges: list[Any], reference: bool = True,
                    console: Any = None) -> list[dict[str, Any]]:
    """One row per judge (after the `human` reference row when `reference`)."""
    rows = [human_reference(pairs)] if reference else []
    for judge in judges:
        if console is not None:
            console.print(f"judging {len(pairs)} pairs with {escape(judge.name)} ...")
        rows.append(evaluate_judge(pairs, judge))
    return rows


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (the columns of the printed table)."""
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [_cell(row, key, fmt) for key, _, fmt in COLUMNS]
        cells[0] = f"`{cells[0]}`"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_table(rows: list[dict[str, Any]], title: str = "judge evaluation") -> Any:
    from rich.table import Table

    table = Table(title=title)
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="left" if header in ("judge", "kind") else "right")
    for row in rows:
        table.add_row(*[escape(_cell(row, key, fmt)) for key, _, fmt in COLUMNS])  # `[logprobs]` is no markup
    return table


def check_output_path(path: str | Path, option: str) -> None:
    """Fail now, before any judging, if `path` cannot be written: a directory, under a file, or not writable.
    Missing parent directories are fine (the writer creates them)."""
    target = Path(path)
    if target.is_dir():
        raise AlignpipeError(f"{option} {path}: cannot write there (a directory)")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise AlignpipeError(f"{option} {path}: cannot write there ({parent} is not a directory)")
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise AlignpipeError(f"{option} {path}: cannot write there (permission denied)")


def judge_eval_command(pairs: str, judge: list[str], json_out: str | None = None, limit: int | None = None,
                       fmt: str = "auto", console: Any = None, llm_options: dict[str, Any] | None = None,
                       cache_dir: str | None = None, test_split: tuple[float, int] | None = None,
                       markdown_out: str | None = None) -> list[dict[str, Any]]:
    """`alignpipe judge-eval --pairs FILE --judge NAME ... [--json OUT] [--limit N]`."""
    from rich.console import Console

    from alignpipe.data.pairs import load_pairs
    from alignpipe.evaluation.judge_registry import resolve_judges
    from alignpipe.records import write_json, write_text_atomic

    console = console or Console()
    for out, option in ((json_out, "--json"), (markdown_out, "--markdown")):
        if out:  # an unwritable output path fails before the judging that would be lost with it
            check_output_path(out, option)
    if not judge:
        raise AlignpipeError("judge-eval needs at least one --judge (e.g. --judge longer --judge reward-model:DIR)")
    if limit is not None and limit < 1:
        raise AlignpipeError(f"--limit must be at least 1, got {limit}")
    data = load_pairs(pairs, fmt=fmt, limit=limit)
    source, train = pairs, []
    if test_split is not None:  # the pairs a reward model trained on the rest of the file has not seen
        from alignpipe.evaluation.reward_model import split_pairs

        fraction, seed = test_split
        train, data = split_pairs(data, fraction, seed)
        source = f"{pairs}, test split: {len(data)} of {len(train) + len(data)} (train fraction {fraction}, seed {seed})"
        if not data:
            raise AlignpipeError(f"--test-split {fraction} leaves no test pairs")
    judges = resolve_judges(judge, llm_options, cache_dir)
    for j in judges:  # weighted ensembles learn their weights from the human labels of the train part
        if callable(getattr(j, "fit", None)) and getattr(j, "weights", 0) is None:
            if test_split is None:
                raise AlignpipeError(f"judge {j.name} is fitted on human labels: give --test-split so that it is "
                                     "fitted on the train part and measured on the rest")
            console.print(f"fitting {j.name} on {len(train)} train pairs ...")
            j.fit(train)
    rows = evaluate_judges(data, judges, console=console)
    console.print(render_table(rows, f"judge evaluation on {len(data)} human-labelled pairs ({source})"))
    for row in rows:
        if row.get("sample_reasons"):
            console.print(f"[yellow]{escape(row['judge'])}[/]: invalid examples: "
                          f"{escape('; '.join(row['sample_reasons']))}")
    if json_out:
        write_json(json_out, json_safe(rows))
        console.print(f"wrote {json_out}")
    if markdown_out:
        write_text_atomic(markdown_out, f"Pairs: {source}\n\n" + markdown_table(rows))
        console.print(f"wrote {markdown_out}")
    return rows
