"""A round's selection step: the recipe's `instantiation.selection` applied to the built examples, with the
inputs its rule reads computed from the round (judgments for uncertainty, policy/reference log-probs for the
implicit margin)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from alignpipe.instantiation.selection import ensemble_margin_variance, judge_disagreement, select
from alignpipe.instantiation.selection_inputs import PairLogps
from alignpipe.records import Candidate, Judgment


def select_examples(cfg: Any, examples: list, candidates: list[Candidate], judgments: list[Judgment], seed: int,
                    logps: Callable[[list], PairLogps] | None = None, dim: str | None = None,
                    ) -> tuple[list, dict[str, Any]]:
    """`cfg` is a config.SelectionConfig; `logps(examples)` gives the pairs' log-probs (implicit_margin).
    Returns the kept examples and the rule's stats (rule, considered, kept, mean_margin, mean_key, dropped)."""
    params = cfg.params()
    if cfg.rule == "random":
        params["seed"] = seed
    elif cfg.rule == "implicit_margin":
        if logps is None:
            raise ValueError("implicit_margin selection needs the pairs' log-probs")
        params["logps"] = logps
    elif cfg.rule == "uncertainty":
        measure = judge_disagreement if cfg.measure == "judge_disagreement" else (
            lambda ex, cands, js: ensemble_margin_variance(ex, cands, js, dim))
        params["values"] = measure(examples, candidates, judgments)
    kept, stats = select(cfg.rule, examples, cfg.budget, **params)
    stats.pop("implicit_margins", None)  # per-pair values: not a round figure
    return kept, stats
