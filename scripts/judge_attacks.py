"""Attack success rates of the LLM judges against the hostile responses of `alignpipe.evaluation.attacks`
(issue 12), per judge and attack kind, without and with the hardened prompts.

    python scripts/judge_attacks.py --backend embedded --backend http://127.0.0.1:8080/v1#smollm2-135m-instruct \\
        --verdict logprobs --verdict generate --cases 10 --json runs/judge-attacks/results.json

`--backend embedded` is SmolLM2-135M-Instruct through transformers; `URL#MODEL` an OpenAI-compatible server
(llama.cpp: `python -m llama_cpp.server --model GGUF --model_alias smollm2-135m-instruct`). Logprob verdicts
need next-token probabilities, which the server backend does not give: those runs are listed as skipped.
Generate mode asks the brief question (the verdict line only) with no re-asks, so an unparseable answer is
an invalid row. Prints one table per backend and verdict mode; `--json` writes everything, `--markdown` the
tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from alignpipe.evaluation import attacks as atk
from alignpipe.evaluation import llm_judge as lj

CLASSES = {"pointwise": lj.PointwiseLLMJudge, "additive": lj.AdditiveLLMJudge, "rubric": lj.RubricLLMJudge,
           "pairwise": lj.PairwiseLLMJudge}


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        name = ""
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"


def make_backend(spec: str, batch_size: int) -> Any:
    from alignpipe.synthesis.backends import OpenAIBackend, TransformersBackend

    if spec.startswith(("http://", "https://")):
        url, sep, model = spec.partition("#")
        if not sep or not model:
            raise SystemExit(f"error: --backend {spec!r}: a server is written URL#MODEL")
        return OpenAIBackend(url, model, api_key_env=None, concurrency=2, timeout=300, max_retries=1)
    from alignpipe.models import embedded_model_dir, resolve_model_path

    path = embedded_model_dir() if spec == "embedded" else resolve_model_path(spec)
    return TransformersBackend(path, batch_size=batch_size)


def make_judge(backend: Any, kind: str, verdict: str, hardened: bool, args: argparse.Namespace) -> Any:
    tokens = args.max_new_tokens * (4 if kind == "rubric" else 1)  # three score lines instead of one
    return CLASSES[kind](backend, verdict=verdict, brief=True, hardened=hardened, max_new_tokens=tokens,
                         parse_retries=0, precision=args.precision, max_response_chars=args.max_response_chars)


def save(report: dict[str, Any], args: argparse.Namespace) -> str:
    """Write the JSON and markdown so far (after every judge: a long run stopped early keeps what it measured)."""
    text = tables(report)
    for path, content in ((args.json, json.dumps(report, indent=1)), (args.markdown, text)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content + "\n")
    return text


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.pairs:
        from alignpipe.data.pairs import load_pairs

        cases = atk.pair_cases(load_pairs(args.pairs, limit=args.cases))
    else:
        cases = atk.arithmetic_cases(args.cases, seed=args.seed)
    attacks = atk.select(args.attack)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    report = {"command": " ".join(["python", *sys.argv]), "machine": machine(), "cases": len(cases),
              "case_source": args.pairs or f"arithmetic (seed {args.seed})", "attacks": [a.name for a in attacks],
              "results": results, "skipped": skipped}
    for spec in args.backend:
        backend = make_backend(spec, args.batch_size)
        for verdict in args.verdict:
            if verdict == "logprobs" and not callable(getattr(backend, "choice_logprobs", None)):
                skipped.append({"backend": spec, "verdict": verdict,
                                "why": f"{backend.name}: this backend gives no next-token probabilities"})
                print(f"skipped: {spec} {verdict} (no choice_logprobs)", file=sys.stderr)
                continue
            for kind in args.judge:
                for hardened in {"off": [False], "on": [True], "both": [False, True]}[args.hardened]:
                    judge = make_judge(backend, kind, verdict, hardened, args)
                    start = time.perf_counter()
                    res = atk.measure(judge, kind, cases, attacks)
                    res.update(backend=spec, verdict=verdict, hardened=hardened,
                               seconds=round(time.perf_counter() - start, 1))
                    results.append(res)
                    save(report, args)
                    print(f"{spec} {verdict} {kind} hardened={hardened}: rate {res['total']['rate']:.1%} "
                          f"invalid {res['total']['invalid']}/{res['total']['n']} ({res['seconds']} s)",
                          file=sys.stderr, flush=True)
    return report


def _pct(k: int, n: int) -> str:
    return f"{k / n:.0%}" if n else "-"


def tables(report: dict[str, Any]) -> str:
    """Markdown: per backend and verdict mode, a row per judge, the rate per attack kind off -> on."""
    out = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in report["results"]:
        groups.setdefault((r["backend"], r["verdict"]), []).append(r)
    for (backend, verdict), rows in groups.items():
        kinds = [k for k in (*atk.KINDS, "control") if any(k in r["kinds"] for r in rows)]
        out.append(f"**{backend}, verdict {verdict}** ({report['cases']} cases; rate = successes / n, "
                   "unhardened -> hardened)\n")
        out.append("| judge | n/attack | clean: good wins | " + " | ".join(kinds) + " | all | flips | invalid |")
        out.append("|---" * (len(kinds) + 6) + "|")
        by_judge: dict[str, dict[bool, dict]] = {}
        for r in rows:
            by_judge.setdefault(r["judge_kind"], {})[r["hardened"]] = r
        for kind, pair in by_judge.items():
            def cell(f: Any, pair: dict[bool, dict] = pair) -> str:
                return " -> ".join(f(pair[h]) for h in (False, True) if h in pair)

            any_row = next(iter(pair.values()))
            line = [kind, str(any_row["attacks"][next(iter(any_row["attacks"]))]["n"]),
                    cell(lambda r: _pct(r["clean"]["good_wins"], r["clean"]["n"]))]
            line += [cell(lambda r, k=k: _pct(r["kinds"][k]["success"], r["kinds"][k]["n"])) for k in kinds]
            line += [cell(lambda r: _pct(r["total"]["success"], r["total"]["n"])),
                     cell(lambda r: _pct(r["total"]["flips"], r["total"]["n"])),
                     cell(lambda r: _pct(r["total"]["invalid"], r["total"]["n"]))]
            out.append("| " + " | ".join(line) + " |")
        out.append("")
    for s in report["skipped"]:
        out.append(f"Skipped: {s['backend']}, verdict {s['verdict']}: {s['why']}.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", action="append", help="embedded | a model directory | URL#MODEL (repeatable)")
    ap.add_argument("--verdict", action="append", choices=["generate", "logprobs"])
    ap.add_argument("--judge", action="append", choices=list(CLASSES))
    ap.add_argument("--attack", action="append", help="an attack name or kind (repeatable; default all)")
    ap.add_argument("--cases", type=int, default=10, help="number of cases (default 10)")
    ap.add_argument("--pairs", help="labelled pairs file (hh-rlhf/TRL): chosen = good, rejected = bad")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hardened", choices=["off", "on", "both"], default="both")
    ap.add_argument("--max-new-tokens", type=int, default=10, help="generate mode (x4 for the rubric)")
    ap.add_argument("--max-response-chars", type=int, default=3000, help="hardened: longer responses are cut")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", help="write the full results here")
    ap.add_argument("--markdown", help="write the tables here")
    args = ap.parse_args(argv)
    args.backend = args.backend or ["embedded"]
    args.verdict = args.verdict or ["logprobs", "generate"]
    args.judge = args.judge or list(CLASSES)
    if args.cases < 1:
        ap.error("--cases must be at least 1")
    try:
        atk.select(args.attack)
    except ValueError as exc:
        ap.error(str(exc))
    report = run(args)
    print(save(report, args))
    print(f"machine: {report['machine']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
