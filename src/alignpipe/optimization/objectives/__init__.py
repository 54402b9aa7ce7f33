"""The objective registry: YAML names -> pure loss functions over per-sequence (or per-token) tensors.

An objective is a plain function. Its positional-or-keyword parameters *without* defaults are the
tensors it reads (named by the conventions below); those *with* defaults are its hyperparameters,
settable from a recipe. It returns `(per_example_loss, metrics)`: a 1-D tensor whose mean is the loss,
and a dict of detached scalar tensors for logging.

Tensor names the trainer provides:

- pair instances (B pairs): `chosen_logps`, `rejected_logps` [B] (token sums over the completion),
  `chosen_lengths`, `rejected_lengths` [B] (completion tokens incl. EOS), `ref_chosen_logps`,
  `ref_rejected_logps` [B] (same under the frozen reference), `margins`, `weights` [B].
- group instances (G groups of K): `token_logps`, `old_token_logps`, `ref_token_logps`, `completion_mask`
  [G*K, T] (group-major), `rewards` [G, K].

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


# Importing the family modules fills the registry.
from alignpipe.optimization.objectives import groupwise, pairwise, pointwise  # noqa: E402,F401
