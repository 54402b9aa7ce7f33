"""Input providers: the tensors an objective reads beyond the policy's own log-probs.

The trainer builds the common tensors itself (`instances.BASE_PROVIDED`: sequence and token log-probs,
lengths, masks, reference log-probs, scores). Anything else - a value head's per-token values, the
full-vocabulary KL to the reference, TIS-DPO token weights, a greedy baseline's reward - comes from a
provider: a small class in this package that declares, per instance kind, the names it builds.

The trainer asks each provider whose names the round's objectives read, in this order:

1. `parameters()`: extra trainable parameters (value or reward heads), added to the optimizer;
2. `prepare(ctx)`: once per round, before the first step: anything fixed for the round (old values,
   token weights, ...);
3. `batch(ctx, indices, seq, placed)`: per batch, a dict of named tensors in the batch layout of
   `instances.py`; they may carry gradient (a head applied to `seq.hidden`);
4. `save(directory)`: with each checkpoint, whatever must be kept besides the policy (head weights).

Options for a provider come from the recipe's `optimization.inputs.<provider name>` mapping and are
validated at load time by the provider's `Options` model (unknown keys fail with their path).
Adding a provider: subclass `InputProvider`, fill `name`, `provides` (and `Options`), decorate with
`@register_provider`, and import the module at the bottom of this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class RoundContext:
    """What a provider may use: the policy, its tokenizer, the round's instances, the optimization config,
    the padding id, the device, and how to get reference log-probs (`reference_model` under full
    fine-tuning, else the adapter-disabled policy: `trainer.reference_context`)."""

    model: Any
    tokenizer: Any
    instances: Any  # optimization.instances.Instances
    cfg: Any  # config.OptimizationConfig
    pad_id: int
    device: torch.device
    reference_model: Any = None


class InputProvider:
    name: ClassVar[str] = ""
    provides: ClassVar[dict[str, frozenset[str]]] = {}  # instance kind -> tensor names
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def parameters(self) -> list[torch.nn.Parameter]:
        return []

    def prepare(self, ctx: RoundContext) -> None:
        """Once per round, before the first step."""

    def batch(self, ctx: RoundContext, indices: list[int], seq: Any, placed: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        """Named tensors for one batch. `seq` is the policy's `SequenceLogps` for the batch rows (with
        `hidden`), `placed` the per-token fixed tensors already in the batch layout."""
        return {}

    def save(self, directory: Path) -> None:
        """With each checkpoint: persist whatever is trained besides the policy."""


PROVIDERS: dict[str, type[InputProvider]] = {}


def register_provider(cls: type[InputProvider]) -> type[InputProvider]:
    if not cls.name or cls.name in PROVIDERS:
        raise ValueError(f"provider {cls.name!r}: needs a unique name")
    PROVIDERS[cls.name] = cls
    return cls


def provided(kind: str) -> frozenset[str]:
    """Every tensor name the trainer can hand to objectives for `kind` examples."""
    from alignpipe.optimization.instances import BASE_PROVIDED

    names = set(BASE_PROVIDED[kind])
    for cls in PROVIDERS.values():
        names |= cls.provides.get(kind, frozenset())
    return frozenset(names)


def providers_for(inputs: set[str], kind: str) -> list[type[InputProvider]]:
    """The provider classes that build any of `inputs` for `kind` examples."""
    return [cls for cls in PROVIDERS.values() if inputs & cls.provides.get(kind, frozenset())]


def validate_options(inputs: dict[str, dict[str, Any]]) -> dict[str, BaseModel]:
    """Recipe `optimization.inputs` -> validated options per provider; ValueError names the bad key."""
    out = {}
    for name, opts in inputs.items():
        if name not in PROVIDERS:
            raise ValueError(f"unknown input provider {name!r}; known: {', '.join(sorted(PROVIDERS)) or 'none'}")
        out[name] = PROVIDERS[name].Options.model_validate(opts or {})
    return out


# Importing the provider modules fills the registry.
from alignpipe.optimization.providers import (  # noqa: E402,F401
    example_fields,
    heads,
    selm,
    token_kl,
    token_weights,
)
