"""The reference policy of reference-based objectives, by mode (`optimization.reference`).

"base" and "round_start" are a context around the policy (`reference_context`): the adapter disabled, or the policy
as it is before the round's first step; under full fine-tuning "base" is a frozen copy that the loop passes as
`reference_model`. "moving" is TR-DPO's soft-updated shadow of the trainable parameters (`MovingReference`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch.func import functional_call
from transformers import PreTrainedModel

T = TypeVar("T")


def reference_context(model: PreTrainedModel, reference: str = "base") -> contextlib.AbstractContextManager:
    """The reference policy without a second copy.

    "base": adapters disabled (the frozen base under LoRA / IA3 / prefix tuning);
    "round_start": the policy as it is before the round's first step (ref = M_t of iterative DPO,
    the staged reference of sDPO). Under full fine-tuning "base" needs a frozen copy: the loop passes
    one as `reference_model` instead.
    """
    if reference == "base" and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


class MovingReference:
    """TR-DPO's soft-updated reference (arXiv 2404.09656) over the trainable parameters: a shadow copy
    that is swapped in to compute reference log-probs, and pulled toward the policy every `every` steps
    by ref <- alpha * theta + (1 - alpha) * ref. Under LoRA the shadow is the adapter (reference =
    base + shadow adapter), which starts equal to the policy at the start of the round.

    Two ways to compute under the shadow: `swapped_in()` copies it into the live parameters (the trainer,
    before the policy forward); `state()` / `call()` substitute it functionally, leaving the live parameters
    and the autograd graph of a forward already run untouched (input providers, after that forward). The
    latter need `names`, the parameters' names in the model (`named_parameters`)."""

    def __init__(self, params: list[torch.nn.Parameter], alpha: float, every: int, names: list[str] | None = None):
        self.params, self.alpha, self.every, self.names = params, alpha, every, names
        self.shadow = [p.detach().clone() for p in params]

    def state(self) -> dict[str, torch.Tensor]:
        """The shadow weights by parameter name (for `torch.func.functional_call` on the model)."""
        if self.names is None:
            raise ValueError("MovingReference built without parameter names")
        return dict(zip(self.names, self.shadow, strict=True))

    def call(self, model: torch.nn.Module, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(model, *args, **kwargs)` with the shadow substituted for the live trainable parameters of `model`,
        functionally (`torch.func.functional_call` on a wrapper whose only submodule is `model`)."""
        state = {f"model.{name}": tensor for name, tensor in self.state().items()}
        return functional_call(_Apply(model), state, (fn, *args), kwargs)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, r in zip(self.params, self.shadow, strict=True):
                p.copy_(r)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live, strict=True):
                    p.copy_(v)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if step % self.every == 0:
            for p, r in zip(self.params, self.shadow, strict=True):
                r.mul_(1 - self.alpha).add_(p.detach(), alpha=self.alpha)


class _Apply(torch.nn.Module):
    """`forward(fn, ...)` = `fn(model, ...)`: lets `functional_call` substitute `model`'s parameters around any
    function of the model (not only its `forward`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)
