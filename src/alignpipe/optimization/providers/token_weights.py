"""TIS-DPO token importance weights from a contrastive model pair (Liu et al., arXiv 2410.04350; methods.md 1.12).

For every completion token, the contrastive score (log-probs, completion tokens only)
    d^w_t = log pi+(y^w_t | x, y^w_<t) - log pi-(y^w_t | x, y^w_<t)   on chosen responses,
    d^l_t = log pi-(y^l_t | x, y^l_<t) - log pi+(y^l_t | x, y^l_<t)   on rejected responses,
is mapped to a weight, either
    "threshold_and_scale" (exlaw/TIS-DPO preference_datasets.py, the code-verified default):
        w_t = w_min + (clamp(d_t, low, high) - low) * (w_max - w_min) / (high - low),  defaults [-1.5, 1.5] -> [0.7, 1.3]
    "exp" (the paper's form, constants unverified): w_t = k * exp(mu * clamp(d_t, low, high)).
The weights are fixed for the round: computed once in `prepare`, before the first step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from alignpipe.optimization.logprobs import SequenceLogps
from alignpipe.optimization.objectives.pairwise_tokens import tisdpo_weights
from alignpipe.optimization.providers import InputProvider, RoundContext, register_provider
from alignpipe.optimization.scoring import completion_logps, place, reference_logps


class TokenWeightOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    positive: str | None = None  # pi+: a model directory or a peft adapter directory; None = policy at round start
    negative: str | None = None  # pi-: likewise; None = the reference (as `optimization.reference` defines it)
    transform: Literal["threshold_and_scale", "exp"] = "threshold_and_scale"
    low: float = -1.5  # clamp bounds of the score d_t
    high: float = 1.5
    w_min: float = 0.7  # threshold_and_scale: weight range
    w_max: float = 1.3
    mu: float = 1.0  # exp: w = k * exp(mu * clamp(d))
    k: float = 1.0

    @model_validator(mode="after")
    def _ordered(self) -> TokenWeightOptions:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.w_min > self.w_max:
            raise ValueError(f"w_min ({self.w_min}) must not exceed w_max ({self.w_max})")
        return self


def token_weights(scores: torch.Tensor, options: TokenWeightOptions) -> torch.Tensor:
    """Contrastive scores d_t -> TIS-DPO weights w_t, elementwise (formulas in the module docstring)."""
    if options.transform == "exp":
        return options.k * torch.exp(options.mu * scores.clamp(min=options.low, max=options.high))
    return tisdpo_weights(scores, options.low, options.high, options.w_min, options.w_max)


def load_contrastive(path: str | Path, device: torch.device) -> Any:
    """A frozen causal LM from `path`: a peft adapter directory (its base model from adapter_config.json)
    or a full model directory."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    elif path.is_dir():
        from alignpipe.models import load_policy

        model = load_policy(path)
    else:
        raise ValueError(f"tisdpo_weights: contrastive model not found: {path}")
    return model.to(device).eval().requires_grad_(False)


@register_provider
class TokenWeights(InputProvider):
    """TIS-DPO token weights `chosen_token_weights`, `rejected_token_weights` [B, T] (arXiv 2410.04350).

    Options (`optimization.inputs.tisdpo_weights`): `positive` / `negative` name the contrastive models
    pi+ / pi- as paths (the paper's best pair: DPO on the pairs / DPO on the reversed pairs). When not
    given, models that exist in every run are used:
    - pi+ = the policy at the start of the round (before its first step);
    - pi- = the reference: `reference_model` when given, else the adapter-disabled base (`reference: base`),
      or the policy at round start (`round_start` / `moving`).
    On the first round of an adapter run the two coincide (d = 0), so every weight is the transform's
    value at 0 (1.0 with the defaults) and the round trains as DPO; later rounds weight tokens by how much
    the rounds so far moved the policy away from the reference on them. With `reference: round_start`
    the default pair always coincides: name at least one model.
    Weights are per completion token, computed once per round; off the mask the batch tensors are 0.
    """

    name = "tisdpo_weights"
    provides = {"pair": frozenset({"chosen_token_weights", "rejected_token_weights"})}
    Options = TokenWeightOptions

    def __init__(self, options: TokenWeightOptions | None = None) -> None:
        super().__init__(options)
        self.values: list[torch.Tensor] = []  # per flat row: weights of its completion tokens (1-D)

    def _logps(self, ctx: RoundContext, path: str | None, role: str) -> list[torch.Tensor]:
        rows = ctx.instances.flat_rows()
        desc = f"TIS-DPO {role} log-probs"
        if path is not None:
            model = load_contrastive(path, ctx.device)
            try:
                return completion_logps(model, rows, ctx.pad_id, ctx.cfg, desc)
            finally:
                del model
        if role == "positive":
            return completion_logps(ctx.model, rows, ctx.pad_id, ctx.cfg, desc)
        return reference_logps(ctx.model, rows, ctx.pad_id, ctx.cfg, desc, ctx.reference_model)

    def prepare(self, ctx: RoundContext) -> None:
        if ctx.instances.kind != "pair":
            raise ValueError(f"tisdpo_weights builds pair tensors; the round's instances are {ctx.instances.kind!r}")
        positive = self._logps(ctx, self.options.positive, "positive")
        negative = self._logps(ctx, self.options.negative, "negative")
        self.values = []
        for k, (pos, neg) in enumerate(zip(positive, negative, strict=True)):
            chosen = k % 2 == 0  # pair rows are [chosen, rejected] per example
            scores = pos - neg if chosen else neg - pos
            self.values.append(token_weights(scores.float(), self.options))

    def batch(self, ctx: RoundContext, indices: list[int], seq: SequenceLogps, placed: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        positions = ctx.instances.flat_positions(indices)
        weights = place([self.values[p] for p in positions], seq.mask)
        n = len(indices)
        return {"chosen_token_weights": weights[:n], "rejected_token_weights": weights[n:]}
