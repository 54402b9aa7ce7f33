"""Input providers: the tensors an objective reads beyond the policy's own log-probs.

The trainer builds the common tensors itself (`instances.BASE_PROVIDED`: sequence and token log-probs,
lengths, masks, reference log-probs, scores). Anything else - a value head's per-token values, the
full-vocabulary KL to the reference, TIS-DPO token weights, a greedy baseline's reward - comes from a
provider: a small class in this package that declares, per instance kind, the names it builds.

The trainer asks each provider whose names the round's objectives read, in this order:

1. `param_groups()`: extra trainable parameters (value or reward heads) as AdamW parameter groups, each
   with its own `lr` or the policy's (`optimization.learning_rate`); the default wraps `parameters()`;
2. `prepare(ctx)`: once per round, before the first step: anything fixed for the round (old values,
   token weights, ...);
3. `batch(ctx, indices, seq, placed)`: per batch, a dict of named tensors in the batch layout of
   `instances.py`; they may carry gradient (a head applied to `seq.hidden`);
4. `save(directory)`: with each checkpoint, whatever must be kept besides the policy (head weights);
   `load(directory)` reads it back: the loop calls it when it resumes past a finished round, so that a
   head continues from its saved state instead of restarting.

Reference quantities under `reference: moving` (TR-DPO): the soft-updated reference is the trainer's
`MovingReference`, handed to providers as `ctx.moving` (None otherwise). `batch()` runs after the policy's
forward, whose autograd graph saved the live parameters, so a provider must never swap the shadow weights
into them there (`MovingReference.swapped_in` is only for the trainer, before that forward); it computes
under the shadow functionally instead: `ctx.moving.state()` (the shadow tensors by parameter name, for
`torch.func.functional_call`) or `ctx.moving.call(model, fn, ...)` (`fn(model, ...)` with the shadow
substituted). The shadow is pulled toward the policy after optimizer steps, so read it per batch.

Options for a provider come from the recipe's `optimization.inputs.<provider name>` mapping and are
validated at load time by the provider's `Options` model (errors name `optimization.inputs.<provider>.<key>`).
Options an objective cannot do without (MODPO's margin dimensions) are checked at load time as well, by the
classmethod `check(options, names)`, with the tensor names the recipe's objectives read from the provider.
Adding a provider: subclass `InputProvider`, fill `name`, `provides` (and `Options`), decorate with
`@register_provider`, and import the module at the bottom of this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, create_model


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class RoundContext:
    """What a provider may use: the policy, its tokenizer, the round's instances, the optimization config,
    the padding id, the device, and how to get reference log-probs (`reference_model` under full
    fine-tuning, else the adapter-disabled policy: `reference.reference_context`; under `reference: moving`,
    the shadow weights of `moving`, used functionally: see the module docstring)."""

    model: Any
    tokenizer: Any
    instances: Any  # optimization.instances.Instances
    cfg: Any  # config.OptimizationConfig
    pad_id: int
    device: torch.device
    reference_model: Any = None
    moving: Any = None  # reference.MovingReference under `reference: moving` (TR-DPO), else None


class InputProvider:
    name: ClassVar[str] = ""
    provides: ClassVar[dict[str, frozenset[str]]] = {}  # instance kind -> tensor names
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel | None = None) -> None:
        self.options = options if options is not None else self.Options()

    @classmethod
    def check(cls, options: BaseModel, names: set[str]) -> None:
        """At recipe load: raise ValueError if `options` cannot build `names` (the tensors of this provider that
        the recipe's objectives read). The message starts with the option key, e.g. `margin: ...`: the
        recipe's error puts `optimization.inputs.<provider>.` before it."""

    def parameters(self) -> list[torch.nn.Parameter]:
        return []

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups of the extra trainable parameters; a group without `lr` trains at the
        policy's learning rate."""
        params = self.parameters()
        return [{"params": params}] if params else []

    def prepare(self, ctx: RoundContext) -> None:
        """Once per round, before the first step."""

    def batch(self, ctx: RoundContext, indices: list[int], seq: Any, placed: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        """Named tensors for one batch. `seq` is the policy's `SequenceLogps` for the batch rows (with
        `hidden`), `placed` the per-token fixed tensors already in the batch layout."""
        return {}

    def save(self, directory: Path) -> None:
        """With each checkpoint: persist whatever is trained besides the policy."""

    def load(self, directory: Path) -> bool:
        """Read back what `save(directory)` wrote (resuming a run); False when there was nothing."""
        return False


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
    """Recipe `optimization.inputs` -> validated options per provider.

    An unknown provider is a ValueError; bad options a pydantic ValidationError located at
    `<provider>.<key>`: the providers' `Options` models are validated as the fields of one model, so that
    the recipe's error (which nests it under `optimization.inputs`) names the provider."""
    for name in inputs:
        if name not in PROVIDERS:
            raise ValueError(f"unknown input provider {name!r}; known: {', '.join(sorted(PROVIDERS)) or 'none'}")
    fields: dict[str, Any] = {name: (PROVIDERS[name].Options, ...) for name in inputs}
    model = create_model("inputs", __config__=ConfigDict(extra="forbid"), **fields)
    validated = model.model_validate({name: opts or {} for name, opts in inputs.items()})
    return {name: getattr(validated, name) for name in inputs}


def check_options(inputs: dict[str, dict[str, Any]], wanted: set[str], kind: str) -> None:
    """Load-time check that the providers building `wanted` for `kind` examples have the options they need;
    ValueError `optimization.inputs.<provider>.<key>: ...`."""
    options = validate_options(inputs)
    for cls in providers_for(wanted, kind):
        try:
            cls.check(options[cls.name] if cls.name in options else cls.Options(), wanted & cls.provides[kind])
        except ValueError as err:
            raise ValueError(f"optimization.inputs.{cls.name}.{err}") from None


# Importing the provider modules fills the registry.
from alignpipe.optimization.providers import (  # noqa: E402,F401
    example_fields,
    heads,
    selm,
    token_kl,
    token_weights,
)
