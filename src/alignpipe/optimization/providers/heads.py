"""Scalar heads on the policy's last hidden state: a PPO critic (`value_head`) and a reward model (`reward_head`).

Both heads are float32 `Linear(H, 1)` layers read off `SequenceLogps.hidden` ([B, L-1, H], position t is
the hidden state that predicts token t+1, the same positions as `token_logps` and `mask`). They are trained
with the round's objectives (their parameters join the optimizer), kept by the caller across rounds, and
saved beside each checkpoint as `<provider name>.safetensors`.

Backbone: the head sits on the policy's own trunk, so what else trains is whatever the trainer trains in the
policy. Under a LoRA adapter the adapter weights train together with the head: a *LoRA reward model* (or
a shared-trunk actor-critic for PPO, as TRL's `AutoModelForCausalLMWithValueHead`); the LM head itself is
never needed by the loss. Under full fine-tuning (`adapter: null`) the whole backbone trains. With a frozen
policy (every parameter `requires_grad=False`) only the head trains, on fixed features; the option
`detach_backbone: true` gives the same for a trainable policy (the head's loss does not reach the trunk).

Learning rate: heads join the policy's AdamW as their own parameter group, at the option `learning_rate`
when set, else the policy's `optimization.learning_rate`: the policy's rate is sized for small updates of
pretrained weights, while a head is a fresh layer that may need a higher one. Start small heads at zero
(`init_std: 0`, the default) and raise the head's `learning_rate` if it learns too slowly.

Resume: `load(directory)` reads the saved file back; the loop calls it for a round it skips, so that the
next round continues from the saved heads (and `init_from` no longer applies once heads are loaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from alignpipe.models import base_model
from alignpipe.optimization.logprobs import SequenceLogps
from alignpipe.optimization.objectives import OBJECTIVES
from alignpipe.optimization.objectives.rl import last_token_index
from alignpipe.optimization.providers import InputProvider, RoundContext, register_provider
from alignpipe.optimization.scoring import completion_values, place


class HeadOptions(BaseModel):
    """Options of a head provider (recipe `optimization.inputs.<provider name>`)."""

    model_config = ConfigDict(extra="forbid")
    init_std: float = Field(0.0, ge=0)  # weight ~ N(0, init_std^2), bias 0; 0 = zero init
    # a checkpoint directory holding `<provider>.safetensors` (or the file itself) to start from; a value
    # head also accepts a reward head's file (InstructGPT initialises the value model from the RM)
    init_from: str | None = None
    detach_backbone: bool = False  # train the head on detached hidden states (the trunk gets no gradient)
    learning_rate: float | None = Field(None, gt=0)  # the head's AdamW lr; None = optimization.learning_rate


def hidden_size(model: Any) -> int:
    """Width H of the policy's last hidden state (the LM head's input features)."""
    base = base_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        return head.in_features
    return base.config.get_text_config().hidden_size


def new_head(width: int, init_std: float = 0.0, device: torch.device | str = "cpu") -> nn.Linear:
    """A float32 `Linear(width, 1)`: weight ~ N(0, init_std^2) (zeros when init_std is 0), bias 0."""
    head = nn.Linear(width, 1, dtype=torch.float32, device=device)
    with torch.no_grad():
        if init_std > 0:
            head.weight.normal_(0.0, init_std)
        else:
            head.weight.zero_()
        head.bias.zero_()
    return head


def apply_head(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """`w . h + b` in float32 for hidden [..., H] -> [...]; autocast is switched off so that a bf16 policy's
    hidden state is cast up rather than the head's weights cast down."""
    hidden = hidden.to(head.weight.device)
    with torch.autocast(hidden.device.type, enabled=False):
        return head(hidden.float()).squeeze(-1)


def _wanted(cfg: Any) -> set[str]:
    """Tensor names read by the round's objectives."""
    return {name for term in cfg.objectives for name in OBJECTIVES[term.name].inputs}


class _HeadProvider(InputProvider):
    """Shared machinery: a `ModuleDict` of named scalar heads, created on first use, saved and loaded as one
    safetensors file with keys `<head>.weight`, `<head>.bias`."""

    Options = HeadOptions
    fallback: ClassVar[dict[str, str]] = {}  # head -> another head's key accepted by `init_from`

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        self.heads = nn.ModuleDict()
        self._initialised = False

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.heads.parameters())

    def param_groups(self) -> list[dict[str, Any]]:
        """One AdamW group for every head of this provider, at `learning_rate` when the option is set."""
        params = self.parameters()
        if not params:
            return []
        group: dict[str, Any] = {"params": params}
        if self.options.learning_rate is not None:
            group["lr"] = self.options.learning_rate
        return [group]

    def _ensure(self, ctx: RoundContext, keys: list[str]) -> None:
        if not self._initialised and self.options.init_from:
            self.load(Path(self.options.init_from), required=True, keys=keys)
        self._initialised = True
        width = None
        for key in keys:
            if key not in self.heads:
                width = width or hidden_size(ctx.model)
                self.heads[key] = new_head(width, self.options.init_std)
        self.heads.to(ctx.device)

    def _hidden(self, seq: SequenceLogps) -> torch.Tensor:
        if seq.hidden is None:
            raise ValueError(f"{self.name}: the policy forward returned no hidden states")
        return seq.hidden.detach() if self.options.detach_backbone else seq.hidden

    def path(self, directory: Path) -> Path:
        return Path(directory) / f"{self.name}.safetensors"

    def save(self, directory: Path) -> None:
        """Head weights as `<directory>/<name>.safetensors` (nothing before the first round)."""
        from safetensors.torch import save_file

        if not len(self.heads):
            return
        Path(directory).mkdir(parents=True, exist_ok=True)
        tensors = {f"{key}.{n}": t.detach().cpu().contiguous()
                   for key, head in self.heads.items() for n, t in head.state_dict().items()}
        save_file(tensors, str(self.path(directory)))

    def load(self, source: Path, required: bool = False, keys: list[str] | None = None) -> bool:
        """Load heads from a checkpoint directory (or a `.safetensors` file); heads missing here are created
        with the saved shape. Returns False when there is no file (an error if `required`). Loaded heads count
        as initialised: `init_from` is not applied over them (a resumed run continues from its checkpoint)."""
        from safetensors.torch import load_file

        source = Path(source)
        file = source if source.suffix == ".safetensors" else self.path(source)
        if not file.is_file():
            if required:
                raise FileNotFoundError(f"{self.name}: no head weights at {file}")
            return False
        state = load_file(str(file))
        for key in keys if keys is not None else sorted({k.split(".")[0] for k in state}):
            prefix = next((p for p in (key, self.fallback.get(key)) if p and f"{p}.weight" in state), None)
            if prefix is None:
                continue
            weight, bias = state[f"{prefix}.weight"], state[f"{prefix}.bias"]
            if key not in self.heads:
                self.heads[key] = new_head(weight.shape[1])
            device = self.heads[key].weight.device
            with torch.no_grad():
                self.heads[key].weight.copy_(weight.to(device))
                self.heads[key].bias.copy_(bias.to(device))
        self._initialised = True
        return True


def rollout_values(ctx: RoundContext, heads: nn.ModuleDict) -> dict[str, list[torch.Tensor]]:
    """Per head, per row of `ctx.instances.flat_rows()`: the head's values at the row's completion positions
    (1-D), under the policy as it is now (one pass of `scoring.completion_values` for all heads)."""
    keys = list(heads)
    per_row = completion_values(ctx.model, ctx.instances.flat_rows(), ctx.pad_id, ctx.cfg, "old values",
                                lambda seq: torch.stack([apply_head(heads[k], seq.hidden) for k in keys], -1),
                                groups=ctx.instances.flat_groups())
    return {k: [values[:, n] for values in per_row] for n, k in enumerate(keys)}


@register_provider
class ValueHead(_HeadProvider):
    """PPO critic(s) on the policy's trunk (PPO arXiv 1707.06347 with GAE arXiv 1506.02438; RLHF as in
    InstructGPT arXiv 2203.02155; Safe-RLHF's reward and cost critics arXiv 2310.12773; methods.md 2.3, 6.1).

    V_t = w . h_t + b,  h_t = the policy's last hidden state at position t (the one predicting token t+1),

    so `values[n, t]` is the value of the state (x, y_<=t) from which completion token t+1 is sampled, aligned
    with `token_logps` / `completion_mask`: `ppo_loss` adds the score to the reward at the last completion
    position (the EOS target) and bootstraps gae's V_{t+1} from the next masked position (0 past the end).
    Tensors (group instances, [G*K, T], 0 off the completion mask):

    - `values`: the head on this batch's hidden states, with gradient (the critic's loss trains it);
    - `old_values`: the same head at the start of the round (the rollout), computed once in `prepare`
      without gradient and placed per batch like the trainer's `old_token_logps`;
    - `cost_values`, `old_cost_values`: the same from a second head (Safe-RLHF's cost critic), created only
      when an objective reads them.
    """

    name = "value_head"
    provides = {"group": frozenset({"values", "old_values", "cost_values", "old_cost_values"})}
    fallback = {"value": "reward"}
    CRITICS: ClassVar[dict[str, tuple[str, str]]] = {
        "value": ("values", "old_values"), "cost": ("cost_values", "old_cost_values")}

    def prepare(self, ctx: RoundContext) -> None:
        wanted = _wanted(ctx.cfg)
        keys = [key for key, names in self.CRITICS.items() if wanted & set(names)]
        self._ensure(ctx, keys)
        self._old = rollout_values(ctx, self.heads)

    def batch(self, ctx: RoundContext, indices: list[int], seq: SequenceLogps, placed: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        positions = ctx.instances.flat_positions(indices)
        hidden = self._hidden(seq)
        out = {}
        for key, head in self.heads.items():
            live, old = self.CRITICS[key]
            out[live] = apply_head(head, hidden).to(seq.mask.device) * seq.mask
            out[old] = place([self._old[key][p] for p in positions], seq.mask)
        return out


@register_provider
class RewardHead(_HeadProvider):
    """Scalar reward model on the policy's trunk: Bradley-Terry (InstructGPT arXiv 2203.02155, methods.md 2.7)
    for pair instances, regression to absolute scores (HelpSteer2 arXiv 2406.08673, methods.md 2.8) for point
    instances; a second head is Safe-RLHF's cost model (arXiv 2310.12773, methods.md 6.1).

    r(x, y) = w . h_last + b,  h_last = the hidden state at the last completion position of the row (the
    final t with `mask[t] = 1`: the state that has read the whole completion and predicts its last token,
    EOS for a finished completion).

    Tensors [B]: pair -> `chosen_rewards`, `rejected_rewards` (rows [chosen; rejected]) and, from the cost
    head, `chosen_costs`, `rejected_costs`; point -> `predicted_scores` (the completion rows; the mismatched
    KL rows are not scored). Each head is created only when an objective reads its tensors.
    """

    name = "reward_head"
    provides = {"pair": frozenset({"chosen_rewards", "rejected_rewards", "chosen_costs", "rejected_costs"}),
                "point": frozenset({"predicted_scores"})}
    HEADS: ClassVar[dict[str, frozenset[str]]] = {
        "reward": frozenset({"chosen_rewards", "rejected_rewards", "predicted_scores"}),
        "cost": frozenset({"chosen_costs", "rejected_costs"})}

    def prepare(self, ctx: RoundContext) -> None:
        wanted = _wanted(ctx.cfg)
        self._ensure(ctx, [key for key, names in self.HEADS.items() if wanted & names])

    def rewards(self, seq: SequenceLogps, rows: int | None = None, key: str = "reward") -> torch.Tensor:
        """The `key` head at the last completion position of the first `rows` rows (all when None): [rows]."""
        hidden, mask = self._hidden(seq), seq.mask
        if rows is not None:
            hidden, mask = hidden[:rows], mask[:rows]
        last = last_token_index(mask).to(hidden.device)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return apply_head(self.heads[key], picked)

    def batch(self, ctx: RoundContext, indices: list[int], seq: SequenceLogps, placed: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        n = len(indices)
        if ctx.instances.kind == "point":
            return {"predicted_scores": self.rewards(seq, n)} if "reward" in self.heads else {}
        out = {}
        for key, side in (("reward", "rewards"), ("cost", "costs")):
            if key in self.heads:
                r = self.rewards(seq, key=key)
                out[f"chosen_{side}"], out[f"rejected_{side}"] = r[:n], r[n:]
        return out
