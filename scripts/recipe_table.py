"""One markdown row block per finished run: held-out metric before/after with its 95% CI, wall time and
peak RSS (from a `/usr/bin/time -v` log beside it, if any), and per round the judge's invalid/error rates and
both-order consistency.

    python scripts/recipe_table.py runs/oaif [runs/self-rewarding ...] [--time-logs DIR]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _time_log(path: Path) -> tuple[str, str]:
    if not path.is_file():
        return "-", "-"
    text = path.read_text(errors="replace")
    wall = re.search(r"Elapsed \(wall clock\) time.*?: (\S+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return (wall.group(1) if wall else "-", f"{int(rss.group(1)) / 1024 / 1024:.2f} GB" if rss else "-")


def run_block(run_dir: Path, time_logs: Path | None) -> str:
    s = json.loads((run_dir / "summary.json").read_text())
    wall, rss = _time_log((time_logs or run_dir) / f"{run_dir.name}.time")
    lines = [f"### {s['name']}", "", f"wall {wall}, peak RSS {rss}", ""]
    if s["before"]["accuracy"] is not None:
        diff = f"{s['difference']:+.1%} [{s['ci95_low']:+.1%}, {s['ci95_high']:+.1%}]" if "difference" in s else "-"
        lines += [f"- {s['heldout_metric']}: before {_pct(s['before']['accuracy'])}, after "
                  f"{_pct(s['after']['accuracy'])} (n={s['after']['n']}), difference {diff}"]
    if "heldout_winrate" in s:
        w = s["heldout_winrate"]
        lines += [f"- win rate of the final policy vs round 0 ({w['judge']}): {_pct(w['win_rate'])} "
                  f"[{_pct(w['ci95_low'])}, {_pct(w['ci95_high'])}], LC {_pct(w['lc_win_rate'])}, "
                  f"ties {w['ties']}/{w['n']}, excluded {w['excluded'] or 0}"]
    lines += ["", "| round | sample reward | examples | judge invalid | judge error | both-order cons. | not ok |"
              " loss | steps |", "|---|---|---|---|---|---|---|---|---|"]
    for r in s["rounds"]:
        j = r.get("judge", {})
        cons = j.get("pairwise", {}).get("both_order_consistency")
        lines.append(f"| {r['round']} | {r['sample_reward']:.3f} | {r['examples']} | {_pct(j.get('invalid_rate'))} | "
                     f"{_pct(j.get('error_rate'))} | {_pct(cons)} | {r.get('judgments_not_ok') or 0} | "
                     f"{r['train'].get('loss', float('nan')):.4f} | {r['train'].get('steps', 0)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--time-logs", default=None, help="folder of NAME.time files from /usr/bin/time -v")
    args = ap.parse_args()
    for run in args.runs:
        print(run_block(Path(run), Path(args.time_logs) if args.time_logs else None))


if __name__ == "__main__":
    main()
