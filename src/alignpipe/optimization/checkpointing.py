"""Gradient checkpointing of the decoder layers while a round trains (`optimization.gradient_checkpointing`):
whole layers recomputed in backward, or selectively: under full fine-tuning the MLP's gate/up projections are
kept (torch's selective-checkpointing policy); under an adapter the outputs of the frozen projections are kept
(`_KeptOutputs`, within a memory budget), so that backward recomputes only the layer's cheap parts and the
adapter's own."""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from alignpipe.models import base_model


def keep_mlp_projections(config: Any) -> Callable[[], Any] | None:
    """A selective-checkpointing context for torch's `checkpoint`: the outputs of the matmuls from the hidden size
    to the MLP's intermediate size (a Llama-style layer's gate and up projections) are saved in the forward pass;
    every other op is recomputed in backward. None where the config names no intermediate size."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    hidden, inner = getattr(config, "hidden_size", None), getattr(config, "intermediate_size", None)
    if not hidden or not inner or hidden == inner:
        return None
    matmuls = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}

    def policy(_ctx: Any, op: Any, *args: Any, **_kwargs: Any) -> CheckpointPolicy:
        if op in matmuls and args[-2].shape[-1] == hidden and args[-1].shape[-1] == inner:
            return CheckpointPolicy.MUST_SAVE  # [tokens, hidden] @ [hidden, intermediate]: not LoRA's rank-r parts
        return CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b for a frozen W and b, saving no tensor for backward (dx = dy W needs only W, which stays
    put while a step runs). With `kept` it returns that tensor, the same call's output from the forward pass,
    instead of computing it again. Saving nothing either way keeps the forward pass and its recomputation the
    same sequence of saved tensors, which torch's non-reentrant checkpoint matches by position."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                kept: torch.Tensor | None) -> torch.Tensor:
        ctx.weight, ctx.input_dtype = weight, x.dtype
        return F.linear(x, weight, bias) if kept is None else kept.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        return grad.matmul(ctx.weight.to(grad.dtype)).to(ctx.input_dtype), None, None, None


class _Queue(collections.deque):
    """One checkpointed call's kept outputs. Backward's recomputation stops once it has every tensor that backward
    needs, so the last projections of a layer may never take theirs back: their bytes are released when the call's
    graph, and with it this queue, is freed."""

    def __init__(self, owner: _KeptOutputs) -> None:
        super().__init__()
        self.owner = owner

    def __del__(self) -> None:
        self.owner.live -= sum(entry[0].nbytes for entry in self if entry is not None)


class _KeptOutputs:
    """What one `gradient_checkpointing` block's frozen projections keep: per checkpointed call a queue of
    outputs (None where the budget was spent), and the bytes kept and not yet handed back, at most `budget`."""

    def __init__(self, budget: int) -> None:
        self.budget, self.live = budget, 0
        self.calls: list[tuple[bool, _Queue]] = []  # innermost call's (recording, queue) last

    @contextlib.contextmanager
    def call(self, recording: bool, queue: _Queue) -> Iterator[None]:
        self.calls.append((recording, queue))
        try:
            yield
        finally:
            self.calls.pop()

    def contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """torch's `context_fn` for one checkpointed call: while its forward pass runs, each frozen projection
        records its output; while backward recomputes the call, the same projections, reached in the same order,
        take those outputs back instead of multiplying again."""
        queue = _Queue(self)
        return self.call(True, queue), self.call(False, queue)

    def forward(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if not self.calls or not torch.is_grad_enabled():
            return F.linear(x, module.weight, module.bias)
        recording, queue = self.calls[-1]
        if recording:
            y = _FrozenLinear.apply(x, module.weight, module.bias, None)
            keep = self.live + y.nbytes <= self.budget
            self.live += y.nbytes if keep else 0
            queue.append((y, y._version) if keep else None)
            return y
        entry = queue.popleft()
        if entry is None:
            return _FrozenLinear.apply(x, module.weight, module.bias, None)
        kept, version = entry
        self.live -= kept.nbytes
        if kept._version != version or kept.shape[:-1] != x.shape[:-1]:  # changed in place, or a different call
            raise RuntimeError(f"checkpointing: the kept output of {module} does not match its recomputation")
        return _FrozenLinear.apply(x, module.weight, module.bias, kept)


@contextlib.contextmanager
def _keep_frozen_projections(base: nn.Module, kept: _KeptOutputs) -> Iterator[None]:
    """Every frozen nn.Linear inside a checkpointed decoder layer (an adapter's base projections) computed by
    `kept.forward` while the block runs, by its own forward afterwards."""
    frozen = [m for layer in base.modules() if isinstance(layer, GradientCheckpointingLayer)
              for m in layer.modules() if type(m) is nn.Linear and not m.weight.requires_grad
              and (m.bias is None or not m.bias.requires_grad)]
    for m in frozen:
        m.forward = functools.partial(kept.forward, m)
    try:
        yield
    finally:
        for m in frozen:
            del m.forward


@contextlib.contextmanager
def gradient_checkpointing(model: PreTrainedModel, mode: bool | str, keep_mb: float = 512) -> Iterator[None]:
    """The model's decoder layers checkpointed (non-reentrant: recomputed in backward, same values and
    gradients) while the block runs, as it was afterwards. `mode`: True (recompute all of a layer), "selective"
    (keep the MLP's gate/up projections, `keep_mlp_projections`, under full fine-tuning; under an adapter keep
    the frozen projections' outputs, `_KeptOutputs`, at most `keep_mb` MB of them at a time, the first layers'
    first), False (off). Skipped for prompt-learning adapters (prefix tuning feeds its virtual tokens as a cache)
    and models that cannot."""
    peft_config = getattr(model, "active_peft_config", None)
    prompt_learning = peft_config is not None and peft_config.is_prompt_learning
    base = base_model(model)
    if not mode or prompt_learning or not getattr(base, "supports_gradient_checkpointing", False) \
            or base.is_activation_checkpointing:
        yield
        return
    kwargs: dict[str, Any] = {"use_reentrant": False}
    keep = contextlib.nullcontext()
    if mode == "selective" and peft_config is None:
        selective = keep_mlp_projections(base.config)
        if selective is not None:
            kwargs["context_fn"] = selective
    elif mode == "selective":
        # torch's selective policy would run in Python for every op, and LoRA adds six ops to each projection (it
        # measured to cost what it saved, docs/performance.md); the frozen projections are kept by their own call
        kept = _KeptOutputs(int(keep_mb * 2**20))
        kwargs["context_fn"] = kept.contexts
        keep = _keep_frozen_projections(base, kept)
    base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    try:
        with keep:
            yield
    finally:
        base.activation_checkpointing_disable()
