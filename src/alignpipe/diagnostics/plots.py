"""The report's per-round signal panels: which figures each panel plots, and inline SVG made with matplotlib.

A panel is one signal across rounds, one line per run (and per series, e.g. reward accuracy before / after).
The SVG is made self-contained for inlining in HTML: no XML prolog or DOCTYPE (which names a w3.org URL), no
metadata block, no namespace URLs (HTML parsers put inline <svg> in the SVG namespace on their own), text as
<text> (searchable, small), and element ids salted with the panel id so several plots on one page never share
an id.
"""

from __future__ import annotations

import io
import re
from typing import Any

STAGES = ("sampling", "judging", "instantiation", "training")
# (panel id, title, y label, [(series label, dotted path into a round's diagnostics)])
PANELS: list[tuple[str, str, str, list[tuple[str, str]]]] = [
    ("sample_reward", "Sample reward (mean score of the round's candidates)", "score",
     [("mean score", "judgments.scores.mean")]),
    ("tie_share", "Prompts whose candidates all tie", "share", [("tie share", "judgments.tie_share")]),
    ("examples", "Examples kept / prompts dropped", "count",
     [("kept", "examples.count"), ("dropped", "examples.dropped.dropped")]),
    ("margin", "Pair margin (mean score gap)", "margin", [("margin mean", "examples.margin.mean")]),
    ("distinct_2", "Distinct-2 of the candidates", "distinct-2", [("distinct-2", "candidates.distinct_2")]),
    ("overlap", "Within-prompt overlap of the candidates", "share",
     [("bigram overlap", "candidates.pairwise_overlap_2"), ("duplicates", "candidates.duplicate_rate")]),
    ("selection", "Selection: examples considered and kept", "count",
     [("considered", "synthesis.selection.considered"), ("kept", "synthesis.selection.kept")]),
    ("truncation", "Truncation rate (no EOS within max_new_tokens)", "share",
     [("truncated", "candidates.truncation_rate")]),
    ("judge_failures", "Judgments not ok", "share",
     [("invalid", "judgments.invalid_rate"), ("error", "judgments.error_rate")]),
    ("loss", "Training loss (mean over the round's steps)", "loss", [("loss", "training.loss")]),
    ("reward_accuracy", "Implicit-reward accuracy on the round's pairs", "accuracy",
     [("before", "training.reward_acc_before"), ("after", "training.reward_acc_after")]),
    ("kl", "Log-ratio to the reference on the round's completions (k1 KL estimate; < 0 once the policy left them)",
     "log pi - log ref",
     [("before", "training.kl_ref_before"), ("after", "training.kl_ref_after")]),
    ("stage_seconds", "Wall time per stage", "seconds",
     [(s, f"timing.stage_seconds.{s}") for s in STAGES]),
    ("stage_memory", "Peak memory (RSS) per stage", "MB", [(s, f"timing.stage_peak_rss_mb.{s}") for s in STAGES]),
]
STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")


def lookup(diag: dict[str, Any], path: str) -> float | None:
    """The number at a dotted path of a round's diagnostics, or None (missing section, key or non-number)."""
    node: Any = diag
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, int | float) and not isinstance(node, bool) else None


def panel_data(runs: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Per panel: its series (run, label, rounds, values; None where a round lacks the figure) and a note
    naming the figures no round of any run recorded."""
    panels = []
    for pid, title, ylabel, series_def in PANELS:
        series, empty = [], []
        for label, path in series_def:
            found = False
            for run, rounds in runs:
                x = [d.get("round") for d in rounds]
                y = [lookup(d, path) for d in rounds]
                found |= any(v is not None for v in y)
                series.append({"run": run, "label": label, "path": path, "x": x, "y": y})
            if not found:
                empty.append(path)
        note = f"not recorded: {', '.join(empty)}" if empty else None
        panels.append({"id": pid, "title": title, "ylabel": ylabel, "series": series, "note": note})
    return panels


def _plain(text: str) -> str:
    return text.replace("$", r"\$")  # no mathtext in labels taken from run names


def panel_svg(panel: dict[str, Any]) -> str:
    """One panel as an inline <svg> element (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(s["run"] for s in panel["series"]))
    labels = list(dict.fromkeys(s["label"] for s in panel["series"]))
    rc = {"svg.fonttype": "none", "svg.hashsalt": f"panel-{panel['id']}", "font.size": 9}
    with matplotlib.rc_context(rc):
        fig, ax = plt.subplots(figsize=(5.4, 2.7))
        try:
            drawn = 0
            for s in panel["series"]:
                pts = [(x, y) for x, y in zip(s["x"], s["y"], strict=True) if x is not None and y is not None]
                if not pts:
                    continue
                name = " / ".join(t for t, keep in ((s["run"], len(runs) > 1), (s["label"], len(labels) > 1)) if keep)
                k = runs.index(s["run"])  # runs differ in colour and marker, so equal values stay visible
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS[k % len(MARKERS)],
                        markersize=4 + 2 * (k > 0), markerfacecolor="none" if k else None,
                        linestyle=STYLES[labels.index(s["label"]) % len(STYLES)],
                        color=f"C{k % 10}", label=_plain(name or s["label"]))
                drawn += 1
            if not drawn:
                ax.text(0.5, 0.5, "not recorded in these rounds", ha="center", va="center", transform=ax.transAxes,
                        color="0.4")
            rounds = sorted({x for s in panel["series"] for x in s["x"] if x is not None})
            ax.set_xticks(rounds)
            ax.set_xlabel("round")
            ax.set_ylabel(_plain(panel["ylabel"]))
            ax.grid(alpha=0.3)
            if drawn > 1:
                ax.legend(fontsize=7, loc="best")
            fig.tight_layout()
            buf = io.StringIO()
            fig.savefig(buf, format="svg")
        finally:
            plt.close(fig)
    return clean_svg(buf.getvalue())


def clean_svg(svg: str) -> str:
    """matplotlib's SVG file as an element to inline in HTML: prolog, DOCTYPE, metadata and namespace URLs
    removed."""
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    return svg.strip()
