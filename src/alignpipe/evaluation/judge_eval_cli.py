"""The `alignpipe judge-eval` command as a typer-compatible function; cli.py registers it with
`app.command("judge-eval")(judge_eval)`."""

from __future__ import annotations

import typer


def judge_eval(
    pairs: str = typer.Option(..., "--pairs", help="Human-labelled pairs: jsonl/parquet, hh-rlhf or TRL "
                              "prompt/chosen/rejected format"),
    judge: list[str] = typer.Option([], "--judge", help="Judge spec, repeatable (default: the embedded model "
                                    "as a pairwise judge, asked in both orders): longer, shorter, "
                                    "reward-model:DIR, pairwise|pointwise|rubric|additive[:MODEL], "
                                    "both-orders:SPEC, ensemble:mean|median|vote|meta|weighted:SPEC+SPEC"),
    json_out: str | None = typer.Option(None, "--json", help="Also write the rows as JSON to this file"),
    markdown_out: str | None = typer.Option(None, "--markdown", help="Also write the table as markdown to this file"),
    limit: int | None = typer.Option(None, "--limit", help="Use only the first N pairs"),
    brief: bool = typer.Option(False, "--brief", help="LLM judges answer with the verdict line only, no "
                               "rationale (a few tokens to generate instead of hundreds)"),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1,
                                              help="Generation budget of LLM judges (default 512; 48 with --brief)"),
    verdict: str = typer.Option("generate", "--verdict", help="How LLM judges give verdicts: 'generate' (write "
                                "an answer, parse it) or 'logprobs' (one forward pass: probabilities of the "
                                "allowed answers after the pre-filled verdict prefix; local models only)"),
    precision: str = typer.Option("auto", "--precision", help="Logprob verdicts: 'auto' (bf16 only where the CPU/GPU has it natively), 'fp32' or 'bf16'"),
    cache: str | None = typer.Option(None, "--cache", help="Directory of remembered judgments (one jsonl per "
                                     "judge): items judged by an earlier run are not judged again"),
    test_split: float | None = typer.Option(None, "--test-split", min=0.0, max=1.0,
                                            help="Use only the test part of a seeded train/test split with this "
                                            "train fraction (as `alignpipe train-reward-model` splits)"),
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the --test-split shuffle"),
    hardened: bool = typer.Option(False, "--hardened", help="LLM judges use the prompts hardened against hostile "
                                  "responses (nonce-tagged blocks, verdict-like claims marked; docs/judges.md)"),
) -> None:
    """Measure judges against human preference labels: agreement, position consistency, invalid rate,
    length bias, length-controlled agreement and throughput."""
    from alignpipe import AlignpipeError
    from alignpipe.evaluation.judge_eval import judge_eval_command
    from alignpipe.evaluation.logprob_verdicts import PRECISIONS, VERDICTS

    if verdict not in VERDICTS:
        raise AlignpipeError(f"--verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
    if precision not in PRECISIONS:
        raise AlignpipeError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    options: dict = {"brief": brief, "max_new_tokens": max_new_tokens or (48 if brief else 512)}
    if verdict != "generate" or precision != "auto":
        options.update(verdict=verdict, precision=precision)
    if hardened:
        options["hardened"] = True
    judge_eval_command(pairs, judge or ["pairwise"], json_out=json_out, limit=limit, llm_options=options,
                       cache_dir=cache, test_split=None if test_split is None else (test_split, split_seed),
                       markdown_out=markdown_out)
