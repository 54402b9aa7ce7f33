"""Per-sequence log-probabilities of completion tokens, without a full-vocabulary log-softmax.

The LM head runs only on completion positions (the prompt and padding never reach it), a chunk of
positions at a time: gather the label logit, subtract the chunk's logsumexp. Under autograd each chunk
is checkpointed, so its [chunk, vocab] logits are recomputed in backward instead of being kept.
Peak extra memory is one chunk of logits instead of [batch, length, vocab] plus its log-softmax copy.
A frozen head (LoRA) needs no recomputation at all: `_FrozenHeadLogps` works out each position's gradient
direction in the forward pass, and backward only scales it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from alignpipe.models import base_model
from alignpipe.optimization.packing import attention_for, pack_groups


@dataclass
class SequenceLogps:
    logps: torch.Tensor  # [B] sum over completion tokens
    token_logps: torch.Tensor  # [B, L-1] per-token log-prob at target positions; 0 off the mask
    mask: torch.Tensor  # [B, L-1] 1 where the target token is a completion token
    lengths: torch.Tensor  # [B] completion tokens counted
    hidden: torch.Tensor | None = None  # [B, L-1, H] last hidden state at each position (for heads)

    @property
    def mean_logps(self) -> torch.Tensor:
        return self.logps / self.lengths.clamp(min=1)


def _split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder backbone, LM head) of a causal LM, or None where logits need more than a linear head."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return None  # prefix/prompt tuning injects virtual tokens in the wrapper's forward
    base = base_model(model)
    config = getattr(base, "config", None)
    # Soft-capped or rescaled logits (Gemma 2, Cohere) are not a plain linear head: fall back.
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def _label_logps(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, temperature: float) -> torch.Tensor:
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


class _FrozenHeadLogps(torch.autograd.Function):
    """log p(target | h) = (h W^T + b)[target] / T - logsumexp((h W^T + b) / T) for a head whose weight takes no
    gradient. Its gradient with respect to h is (W[target] - softmax(logits) W) / T: a [P, H] tensor that the
    forward pass computes from the logits it already has, so backward is one multiply. Against a checkpointed
    chunk this saves the logits' recomputation and the backward's [P, V] softmax (one of three vocabulary-size
    matmuls per completion token) and keeps [P, H] instead of nothing."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,  # noqa: ANN001
                bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
        raw = torch.nn.functional.linear(hidden, weight, bias)  # autocast's dtype, as the head's own call
        logits = raw.float() / temperature
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        picked = logits.gather(-1, targets.unsqueeze(-1))
        # onehot(target) - softmax, in place (the logits are not needed again), in fp32 before the matmul casts
        # it: the rounding of the plain backward, which multiplies the same [P, V] gradient by W
        coeffs = logits.sub_(lse).exp_().neg_().scatter_add_(-1, targets.unsqueeze(-1), torch.ones_like(lse))
        direction = coeffs.to(raw.dtype) @ weight.to(raw.dtype)
        ctx.save_for_backward(direction)
        ctx.scale, ctx.hidden_dtype = 1.0 / temperature, hidden.dtype
        return (picked - lse).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (direction,) = ctx.saved_tensors
        grad_hidden = (grad.unsqueeze(-1) * ctx.scale * direction.float()).to(ctx.hidden_dtype)
        return grad_hidden, None, None, None, None


def _chunk_logps(h: torch.Tensor, t: torch.Tensor, head: nn.Module, temperature: float) -> torch.Tensor:
    """One chunk's label log-probs: without a graph when nothing needs one; through `_FrozenHeadLogps` when only
    the hidden states take gradients (a frozen linear head); else checkpointed (logits recomputed in backward)."""
    if not (torch.is_grad_enabled() and h.requires_grad):
        return _label_logps(h, t, head, temperature)
    if type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters()):
        return _FrozenHeadLogps.apply(h, t, head.weight, head.bias, temperature)
    return checkpoint(_label_logps, h, t, head, temperature, use_reentrant=False)


def sequence_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    groups: list[list[int]] | None = None,
) -> SequenceLogps:
    """Log-probs of completion tokens for right-padded `[prompt | completion | pad]` rows.

    input_ids, attention_mask, completion_mask: [B, L]; completion_mask is 1 on completion tokens
    (EOS included) only. Position t predicts token t+1, so outputs are [B, L-1].
    `temperature`: divide logits by the sampling temperature (on-policy RL); 1 for offline methods.
    `groups`: rows that share a prompt (a pair's two rows, a group's K rows), as lists of row indices; the
    decoder then runs once per group on the packed layout of `packing.py` (the shared prompt computed once, no
    padding between a group's rows). Same values and gradients as without, in the same [B, L-1] layout.
    """
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(torch.bool)
    parts = _split_head(model)
    token_logps = torch.zeros(targets.shape, dtype=torch.float32, device=input_ids.device)
    if parts is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        logits, hidden = out.logits[:, :-1], out.hidden_states[-1][:, -targets.shape[1] - 1 : -1]
        selected = _label_logps_from_logits(logits[mask], targets[mask], temperature)
    else:
        decoder, head = parts
        hidden = _packed_hidden(decoder, input_ids, attention_mask, groups) if groups else None
        if hidden is None:
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        hidden = hidden[:, :-1]
        hidden_sel, targets_sel = hidden[mask], targets[mask]  # [P, H], [P]: completion positions only
        pieces = []
        for start in range(0, hidden_sel.shape[0], chunk_size):
            h, t = hidden_sel[start : start + chunk_size], targets_sel[start : start + chunk_size]
            pieces.append(_chunk_logps(h, t, head, temperature))
        selected = torch.cat(pieces) if pieces else hidden_sel.new_zeros(0, dtype=torch.float32)
    token_logps = token_logps.masked_scatter(mask, selected)
    return SequenceLogps(
        logps=token_logps.sum(-1), token_logps=token_logps, mask=mask.float(), lengths=mask.sum(-1).float(),
        hidden=hidden,
    )


def _packed_hidden(decoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   groups: list[list[int]]) -> torch.Tensor | None:
    """The decoder's last hidden state [B, L, H] in the plain layout, computed on the prefix-shared packed
    layout; None where the attention implementation takes no custom mask (then the caller runs plain)."""
    packed = pack_groups(input_ids, attention_mask, groups)
    dtype = next(decoder.parameters()).dtype
    mask = attention_for(decoder.config, packed.attention, dtype)
    if mask is None:
        return None
    out = decoder(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids, use_cache=False)
    flat = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
    return flat[packed.index]


def _label_logps_from_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float() / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
