"""The objective registry: YAML names -> pure loss functions over per-sequence (or per-token) tensors.

An objective is a plain function. Its positional-or-keyword parameters *without* defaults are the
tensors it reads (named by the conventions below); those *with* defaults are its hyperparameters,
settable from a recipe. It returns `(per_example_loss, metrics)`: a 1-D tensor whose mean is the loss,
and a dict of detached scalar tensors for logging.

Tensor names the trainer provides:

- pair instances (B pairs): `chosen_logps`, `rejected_logps` [B] (token sums over the completion),
  `chosen_lengths`, `rejected_lengths` [B] (completion tokens incl. EOS), `ref_chosen_logps`,
  `ref_rejected_logps` [B] (same under the frozen reference), `margins`, `weights` [B].
- per-token pair tensors [B, T] (trainer layout: position t predicts token t+1, 0 off the mask):
  `chosen_token_logps`, `rejected_token_logps`, `ref_chosen_token_logps`, `ref_rejected_token_logps`,
  `chosen_mask`, `rejected_mask` (1 on completion tokens, EOS included); TIS-DPO token weights
  `chosen_token_weights`, `rejected_token_weights`; TDPO / TIS-DPO per-position full-vocabulary
  KL(pi_ref || pi_theta) `chosen_token_kl`, `rejected_token_kl` (differentiable through pi_theta).
- more pair tensors [B]: `chosen_logsumsq`, `rejected_logsumsq` (WPO: token sums of
  log SUM_v pi(v|ctx)^2 under the policy); `sampled_logps`, `ref_sampled_logps` (SELM: a reference
  sample for the same prompt); `chosen_margin_rewards`, `rejected_margin_rewards` [B, M-1] (MODPO);
  reward-model heads `chosen_rewards`, `rejected_rewards` (Bradley-Terry); cost-model heads
  `chosen_costs`, `rejected_costs` with bool `chosen_unsafe`, `rejected_unsafe` (Safe-RLHF cost model).
- point instances (B completions): `logps`, `lengths`, `ref_logps` [B], `labels` [B] bool (True =
  desirable), `scores` [B] (or [B, K] ratings), `weights` [B]; `kl_logps`, `ref_kl_logps` [B] (KTO z0:
  token sums of mismatched prompt/completion pairs); `predicted_scores` [B] or [B, K] (regression reward
  head); `optimal_values` [B] (A*PO V*(x)).
- group instances (G groups of K): `token_logps`, `old_token_logps`, `ref_token_logps`, `completion_mask`
  [G*K, T] (group-major), `rewards` [G, K]; list methods read per-completion `logps`, `lengths`,
  `ref_logps` [G*K] (token sums, group-major); PPO / Safe-RLHF critics `values`, `old_values`,
  `cost_values`, `old_cost_values` [G*K, T] and `costs` [G, K]; ReMax `baseline_rewards` [G] (greedy decode).

Names starting with `ref_` are reference-model quantities: they are what makes `needs_reference` true.

Adding an objective: write the function in the family's module, decorate it with `@register(...)`,
add one test. Reference needs, inputs and defaults are read off the signature.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Metrics = dict[str, torch.Tensor]
LossFn = Callable[..., tuple[torch.Tensor, Metrics]]


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    fn: LossFn
    family: str
    instances: tuple[str, ...]
    arxiv: str
    inputs: tuple[str, ...] = field(default=())
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_reference(self) -> bool:
        return any(name.startswith("ref_") for name in self.inputs)

    @property
    def needs_old_policy(self) -> bool:
        return "old_token_logps" in self.inputs

    def __call__(self, tensors: dict[str, torch.Tensor], **params: Any) -> tuple[torch.Tensor, Metrics]:
        missing = [n for n in self.inputs if n not in tensors]
        if missing:
            raise KeyError(f"objective {self.name!r} needs {missing}, which this batch does not carry")
        return self.fn(**{n: tensors[n] for n in self.inputs}, **{**self.defaults, **params})

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "instances": list(self.instances),
            "inputs": list(self.inputs),
            "reference": "required" if self.needs_reference else "none",
            "defaults": self.defaults,
            "arxiv": self.arxiv,
            "signature": f"{self.fn.__module__}.{self.fn.__name__}{inspect.signature(self.fn)}",
        }


OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register(name: str, *, family: str, instances: tuple[str, ...], arxiv: str) -> Callable[[LossFn], LossFn]:
    def wrap(fn: LossFn) -> LossFn:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} registered twice")
        params = inspect.signature(fn).parameters.values()
        inputs = tuple(p.name for p in params if p.default is inspect.Parameter.empty)
        defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        OBJECTIVES[name] = ObjectiveSpec(name, fn, family, instances, arxiv, inputs, defaults)
        return fn

    return wrap


def combined_loss(
    terms: list[tuple[str, float, dict[str, Any]]], tensors: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, Metrics]:
    """Weighted sum of objectives: `sum_i w_i * mean(loss_i)`. Metrics are prefixed by objective name."""
    total = torch.zeros((), device=next(iter(tensors.values())).device)
    metrics: Metrics = {}
    for name, weight, params in terms:
        losses, m = OBJECTIVES[name](tensors, **params)
        loss = losses.mean()
        total = total + weight * loss
        metrics[f"{name}/loss"] = loss.detach()
        metrics.update({f"{name}/{k}": v.detach() for k, v in m.items()})
    return total, metrics


def objectives_markdown() -> str:
    """The reference page docs/objectives.md, generated from the registry (`alignpipe objectives --markdown`)."""
    lines = [
        "# Objectives",
        "",
        "Generated by `alignpipe objectives --markdown` from the registry; do not edit by hand.",
        "",
        "Every objective is a pure function: call it directly on tensors, or name it in a recipe's",
        "`optimization.objectives` list (`{name: ..., weight: ..., <hyperparameter>: ...}`). Parameters without",
        "defaults are the tensors it reads (names as in `alignpipe.optimization.objectives`), the others are",
        "hyperparameters. It returns `(per_example_loss, metrics)`.",
        "",
        "| name | family | instances | reference | arXiv |",
        "|---|---|---|---|---|",
    ]
    specs = sorted(OBJECTIVES.values(), key=lambda s: (s.family, s.name))
    lines += [f"| `{s.name}` | {s.family} | {', '.join(s.instances)} | "
              f"{'required' if s.needs_reference else 'none'} | {s.arxiv} |" for s in specs]
    for s in specs:
        doc = inspect.getdoc(s.fn) or ""
        lines += ["", f"## `{s.name}`", "", "```python",
                  f"from {s.fn.__module__} import {s.fn.__name__}",
                  f"{s.fn.__name__}{inspect.signature(s.fn)}", "```", "", doc]
    return "\n".join(lines) + "\n"


# Importing the family modules fills the registry.
from alignpipe.optimization.objectives import (  # noqa: E402,F401
    groupwise,
    listwise,
    multiobjective,
    pairwise,
    pairwise_extended,
    pairwise_reffree,
    pairwise_tokens,
    pointwise,
    rl,
)
