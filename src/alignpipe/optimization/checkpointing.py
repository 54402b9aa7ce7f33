"""Gradient checkpointing of the decoder layers while a round trains (`optimization.gradient_checkpointing`):
whole layers recomputed in backward, or selectively (the MLP's gate/up projections kept)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import PreTrainedModel

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


@contextlib.contextmanager
def gradient_checkpointing(model: PreTrainedModel, mode: bool | str) -> Iterator[None]:
    """The model's decoder layers checkpointed (non-reentrant: recomputed in backward, same values and
    gradients) while the block runs, as it was afterwards. `mode`: True (recompute all of a layer), "selective"
    (keep the MLP's gate/up projections, `keep_mlp_projections`, under full fine-tuning; as True under an
    adapter), False (off). Skipped for prompt-learning adapters (prefix tuning feeds its virtual tokens as a cache)
    and models that cannot."""
    peft_config = getattr(model, "active_peft_config", None)
    prompt_learning = peft_config is not None and peft_config.is_prompt_learning
    base = base_model(model)
    if not mode or prompt_learning or not getattr(base, "supports_gradient_checkpointing", False) \
            or base.is_activation_checkpointing:
        yield
        return
    kwargs: dict[str, Any] = {"use_reentrant": False}
    # selective under an adapter: the policy runs in Python for every op, and LoRA adds six ops to each projection;
    # measured on the embedded model, that costs about what it saves (docs/performance.md), so whole layers there
    selective = keep_mlp_projections(base.config) if mode == "selective" and peft_config is None else None
    if selective is not None:
        kwargs["context_fn"] = selective
    base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    try:
        yield
    finally:
        base.activation_checkpointing_disable()
