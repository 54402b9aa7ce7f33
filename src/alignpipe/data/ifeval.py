"""Instruction following with verifiable constraints (the idea of IFEval, arXiv 2311.07911; prompts written
for alignpipe): everyday requests, each stating 1-3 constraints that a program can check ("under 60 words",
"all in lowercase", "end with ..."), so instruction following is measured without a judge model.

The built-in set (`ifeval_prompts.jsonl`, package data) carries each prompt's constraints as rule specs in
`Prompt.meta["rules"]`: the pipeline's `rule_verifier` judges them as it judges any prompt with rules, and
`ifeval_scores` summarises a model's responses the way IFEval reports them:

- `prompt_accuracy`: share of prompts whose constraints are all met (IFEval's prompt-level strict accuracy;
  a prompt's `rules_mode` is ignored here: every stated constraint counts);
- `instruction_accuracy`: share of all constraints met;
- `per_kind` (and `per_kind_n`): accuracy per constraint kind, so a regression shows which kind broke. A
  rule's kind is the part of its `name` before `:` when the spec names it (`no_commas`, a `contains_none` of
  ",", and `forbidden_word:rain`, a `word_frequency` with max 0, report apart from their rule types), else
  its `type`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from typing import Any

from alignpipe.evaluation.rules import ruleset_from_spec
from alignpipe.records import Prompt

TASK = "instructions"
_RESOURCE = "ifeval_prompts.jsonl"


def load_ifeval_prompts() -> list[Prompt]:
    """The built-in prompts (ids `ifeval-NNN`, task `instructions`), rules in `meta["rules"]`, in file order.
    Fixed and small: meant as a held-out measurement, not a training pool."""
    text = resources.files("alignpipe.data").joinpath(_RESOURCE).read_text(encoding="utf-8")
    prompts = []
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            prompts.append(Prompt(id=row["id"], prompt=row["prompt"], task=TASK, meta={"rules": row["rules"]}))
    return prompts


def constraint_kind(spec: dict[str, Any]) -> str:
    """The kind a rule spec is reported under in `per_kind` (see the module docstring)."""
    name = spec.get("name")
    return name.split(":", 1)[0] if isinstance(name, str) and name else str(spec["type"])


def ifeval_scores(prompts: Sequence[Prompt], responses: Sequence[str]) -> dict[str, Any]:
    """Score `responses[i]` against the rules of `prompts[i]`. Returns `n` (prompts), `n_instructions`
    (constraints), `prompt_accuracy`, `instruction_accuracy`, `per_kind` {kind: accuracy} and `per_kind_n`
    {kind: constraints of that kind}. A prompt without valid rules raises ValueError naming it: a broken
    evaluation set must not pass as a low score."""
    if len(prompts) != len(responses):
        raise ValueError(f"ifeval_scores: {len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("ifeval_scores: no prompts")
    all_met = met_total = n_total = 0
    kind_met: dict[str, int] = {}
    kind_n: dict[str, int] = {}
    for prompt, response in zip(prompts, responses, strict=True):
        specs = prompt.meta.get("rules")
        try:
            rules = ruleset_from_spec(specs, mode="all", name=prompt.id)
        except ValueError as exc:
            raise ValueError(f"ifeval_scores: prompt {prompt.id!r}: {exc}") from None
        results = rules.evaluate(response)["results"]  # in spec order: names are unique within a prompt
        oks = [ok for ok, _ in results.values()]
        for spec, ok in zip(specs, oks, strict=True):
            kind = constraint_kind(spec)
            kind_n[kind] = kind_n.get(kind, 0) + 1
            kind_met[kind] = kind_met.get(kind, 0) + int(ok)
        all_met += all(oks)
        met_total += sum(oks)
        n_total += len(oks)
    return {"n": len(prompts), "n_instructions": n_total, "prompt_accuracy": all_met / len(prompts),
            "instruction_accuracy": met_total / n_total,
            "per_kind": {k: kind_met[k] / kind_n[k] for k in sorted(kind_n)},
            "per_kind_n": dict(sorted(kind_n.items()))}
