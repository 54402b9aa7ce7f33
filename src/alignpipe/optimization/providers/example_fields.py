"""Input providers that read what the loop carried on the examples themselves (no extra model passes).

- `greedy_baseline`: ReMax's `baseline_rewards` [G] (arXiv 2310.10505): b(x) = r(x, y_greedy), the judged score
  of one greedy decode of the round-start policy per prompt. The loop decodes and judges it (only when an
  objective reads `baseline_rewards`) and carries it as `GroupExample.baseline_score`.
- `optimal_values`: A*PO's `optimal_values` [B] (arXiv 2505.20686, stage 1):
  V*(x) = beta1 * log( (1/N) SUM_i exp(r(x, y_i) / beta1) ), over the N scored samples of the prompt in the
  round's point examples (all of a prompt's candidates become point examples). beta1 is this provider's
  option `optimization.inputs.optimal_values.beta` (default 0.5, the paper's); it is not the loss's `beta`
  (beta2 = 1e-3), which scales the policy log-ratio. The samples are the round-start policy's: exactly
  pi_ref's in round 0 (or with `reference: round_start`), an approximation for later rounds against `base`.
- `score_dims`: extra judgment dimensions, named in `optimization.inputs.score_dims`:
  `margin: [dim, ...]` -> MODPO's `chosen_margin_rewards`, `rejected_margin_rewards` [B, M-1] (arXiv 2310.03708;
  the order follows `objective_weights[1:]`), and `cost: dim` -> Safe-RLHF's `costs` [G, K] and the
  cost-model labels `chosen_unsafe`, `rejected_unsafe` [B] (arXiv 2310.12773), unsafe = cost > 0 (the paper's
  threshold d = 0). `invert_cost: true` reads cost = 1 - value, for a 0/1 check that is 1 when passed (a rule
  `rule:<name>` of `rule_verifier`): failing it costs 1 (unsafe), passing it 0 (safe).
  A dimension missing from one judgment (an errored one) counts 0, as `instantiation.score_of` does; one that
  no example carries is an error naming the dimensions they do carry.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from pydantic import Field

from alignpipe import AlignpipeError
from alignpipe.optimization.logprobs import SequenceLogps
from alignpipe.optimization.objectives import OBJECTIVES
from alignpipe.optimization.objectives.pointwise import astar_values
from alignpipe.optimization.providers import InputProvider, NoOptions, RoundContext, register_provider


def _wanted(ctx: RoundContext) -> set[str]:
    """Every tensor name the round's objectives read."""
    return {name for term in ctx.cfg.objectives for name in OBJECTIVES[term.name].inputs}


@register_provider
class GreedyBaseline(InputProvider):
    """ReMax `baseline_rewards` [G]: each group's `baseline_score` (the reward of the greedy decode)."""

    name = "greedy_baseline"
    provides = {"group": frozenset({"baseline_rewards"})}

    def prepare(self, ctx: RoundContext) -> None:
        if any(e.baseline_score is None for e in ctx.instances.examples):
            raise AlignpipeError("baseline_rewards: group examples carry no baseline_score (the reward of a greedy "
                                 "decode); the loop adds it when an objective reads baseline_rewards")

    def batch(self, ctx: RoundContext, indices: list[int], seq: SequenceLogps, placed: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        values = [ctx.instances.examples[i].baseline_score for i in indices]
        return {"baseline_rewards": torch.tensor(values, dtype=torch.float32, device=seq.logps.device)}


class OptimalValuesOptions(NoOptions):
    beta: float = Field(0.5, gt=0)  # A*PO beta1 (V* temperature), not the loss's beta2


@register_provider
class OptimalValues(InputProvider):
    """A*PO `optimal_values` [B]: V*(x) of each point example's prompt from the scores of all the round's point
    examples of that prompt (grouped by `prompt_id`, by the prompt text where it is empty)."""

    name = "optimal_values"
    provides = {"point": frozenset({"optimal_values"})}
    Options = OptimalValuesOptions

    def prepare(self, ctx: RoundContext) -> None:
        examples = ctx.instances.examples
        groups: dict[str, list[int]] = defaultdict(list)
        for i, e in enumerate(examples):
            groups[e.prompt_id or e.prompt].append(i)
        self.values = torch.zeros(len(examples), dtype=torch.float64)
        for members in groups.values():
            rewards = torch.tensor([examples[i].score for i in members], dtype=torch.float64)
            self.values[members] = astar_values(rewards, self.options.beta)

    def batch(self, ctx: RoundContext, indices: list[int], seq: SequenceLogps, placed: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        return {"optimal_values": self.values[indices].to(torch.float32).to(seq.logps.device)}


class ScoreDimsOptions(NoOptions):
    margin: list[str] = Field(default_factory=list)  # MODPO: the other objectives' dimensions, w[1:] order
    cost: str | None = None  # Safe-RLHF: the cost dimension; cost > 0 = unsafe
    invert_cost: bool = False  # cost = 1 - value (a 0/1 "passed" check such as a rule)


@register_provider
class ScoreDims(InputProvider):
    """Named judgment dimensions carried on the examples (`chosen_dims` / `rejected_dims`, `dims`)."""

    name = "score_dims"
    provides = {
        "pair": frozenset({"chosen_margin_rewards", "rejected_margin_rewards", "chosen_unsafe", "rejected_unsafe"}),
        "group": frozenset({"costs"}),
    }
    Options = ScoreDimsOptions
    MARGIN = frozenset({"chosen_margin_rewards", "rejected_margin_rewards"})
    COST = frozenset({"costs", "chosen_unsafe", "rejected_unsafe"})

    @classmethod
    def check(cls, options: ScoreDimsOptions, names: set[str]) -> None:
        """The dimensions are named nowhere else: without them the objective has no margin or cost to read."""
        if names & cls.MARGIN and not options.margin:
            raise ValueError(f"margin: required for {', '.join(sorted(names & cls.MARGIN))} (MODPO): name the "
                             "margin dimensions, e.g. margin: ['rule:concise']")
        if names & cls.COST and options.cost is None:
            raise ValueError(f"cost: required for {', '.join(sorted(names & cls.COST))} (Safe-RLHF): name the "
                             "cost dimension (cost > 0 = unsafe; invert_cost: true for a 0/1 passed check)")

    def prepare(self, ctx: RoundContext) -> None:
        wanted = _wanted(ctx) & self.provides.get(ctx.instances.kind, frozenset())
        self.wanted = wanted
        try:  # recipes are checked at load; a config built in code meets the same check here
            self.check(self.options, wanted)
        except ValueError as err:
            raise AlignpipeError(f"optimization.inputs.score_dims.{err}") from None
        per_example = [self._dims(e) for e in ctx.instances.examples]
        carried = {k for dims in per_example for d in dims for k in d}
        needed = list(self.options.margin) if wanted & self.MARGIN else []
        if wanted & self.COST:
            needed.append(self.options.cost)
        absent = [d for d in needed if d not in carried]
        if absent:
            raise AlignpipeError(f"optimization.inputs.score_dims: no example carries {absent}; "
                                 f"the judgments have {sorted(carried) or 'no dimensions'}")

    @staticmethod
    def _dims(example: object) -> list[dict[str, float]]:
        if hasattr(example, "chosen_dims"):
            return [example.chosen_dims, example.rejected_dims]
        return list(example.dims)

    def _cost(self, dims: dict[str, float]) -> float:
        value = float(dims.get(self.options.cost, 0.0))
        return 1.0 - value if self.options.invert_cost else value

    def batch(self, ctx: RoundContext, indices: list[int], seq: SequenceLogps, placed: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        exs = [ctx.instances.examples[i] for i in indices]
        dev = seq.logps.device
        out: dict[str, torch.Tensor] = {}
        if ctx.instances.kind == "group":
            if "costs" in self.wanted:
                if any(len(e.dims) != len(e.completions) for e in exs):
                    raise AlignpipeError("costs: a group example lacks per-completion score dimensions (dims)")
                out["costs"] = torch.tensor([[self._cost(d) for d in e.dims] for e in exs], dtype=torch.float32,
                                            device=dev)
            return out
        if self.options.margin:
            for side in ("chosen", "rejected"):
                rows = [[float(getattr(e, f"{side}_dims").get(d, 0.0)) for d in self.options.margin] for e in exs]
                out[f"{side}_margin_rewards"] = torch.tensor(rows, dtype=torch.float32, device=dev)
        if self.options.cost is not None:
            for side in ("chosen", "rejected"):
                costs = [self._cost(getattr(e, f"{side}_dims")) for e in exs]
                out[f"{side}_unsafe"] = torch.tensor(costs, device=dev) > 0
        return out
