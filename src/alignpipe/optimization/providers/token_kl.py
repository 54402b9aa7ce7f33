"""Full-vocabulary per-position quantities of the policy: TDPO's token KL and WPO's log SUM_v pi^2.

Both need the whole next-token distribution at every completion position, not only the label's
log-prob. Like `logprobs.py`, the LM head is applied to completion positions only (prompt and padding
never reach it), a chunk of positions at a time, and under autograd each chunk is checkpointed: peak
extra memory is one chunk of [chunk, vocab] logits (two for the KL: policy and reference), never
[batch, length, vocab]. The policy's positions come from `seq.hidden` (the trainer's forward), so the
policy decoder runs once per batch; the KL adds one no-grad decoder forward of the reference.

- `token_kl` (TDPO, Zeng et al., arXiv 2404.11999; TIS-DPO token-level variant, arXiv 2410.04350):
  `chosen_token_kl`, `rejected_token_kl` [B, T] with
  KL_t = SUM_v pi_ref(v|ctx_t) * (log pi_ref(v|ctx_t) - log pi_theta(v|ctx_t)), differentiable through pi_theta.
- `logsumsq` (WPO, Zhou et al., arXiv 2406.11827): `chosen_logsumsq`, `rejected_logsumsq` [B] with
  S(y) = SUM_t log SUM_v pi_theta(v|ctx_t)^2 = SUM_t logsumexp(2 * log_softmax(logits_t)); detached, as
  `wpo_aligned` reads it inside its no-grad pair weight.

Logits are divided by `cfg.temperature` and cast to float32, matmuls run under the trainer's bf16
autocast when `precision: bf16`, as in `logprobs.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from alignpipe.models import base_model
from alignpipe.optimization.logprobs import SequenceLogps, _split_head
from alignpipe.optimization.providers import InputProvider, RoundContext, register_provider
from alignpipe.optimization.reference import reference_context
from alignpipe.optimization.scoring import autocast

Head = Callable[[torch.Tensor], torch.Tensor]


def output_head(model: nn.Module) -> nn.Module:
    """The linear LM head of a causal LM (peft wrappers included): logits = head(last hidden state).

    Raises ValueError for soft-capped or rescaled logits (Gemma 2, Cohere), where a full-vocabulary
    quantity cannot be computed from the last hidden state with the head alone."""
    base = base_model(model)
    config = getattr(base, "config", None)
    head = base.get_output_embeddings()
    if head is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        raise ValueError(f"{type(base).__name__}: full-vocabulary token quantities need a plain linear LM head")
    return head


def last_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """[B, L-1, H] last (normed) hidden state at each position, as `SequenceLogps.hidden`.

    `params`: replacement values for some of `model`'s parameters (by `named_parameters` name), applied
    with `torch.func.functional_call`, i.e. without touching the live parameters (whose autograd graph
    of the policy's forward must stay intact)."""
    params = params or {}
    parts = _split_head(model)
    if parts is not None:
        decoder = parts[0]
        names = {id(p): n for n, p in model.named_parameters()}
        local = {n: params[names[id(p)]] for n, p in decoder.named_parameters() if names.get(id(p)) in params}
        out = functional_call(decoder, local, (), {"input_ids": input_ids, "attention_mask": attention_mask})
        return out.last_hidden_state[:, :-1]
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "output_hidden_states": True}
    out = functional_call(model, params, (), kwargs)
    return out.hidden_states[-1][:, -input_ids.shape[1] : -1]  # prompt tuning prepends virtual positions


def _log_softmax(head: Head, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1)


def _kl_chunk(hidden: torch.Tensor, ref_hidden: torch.Tensor, head: Head, ref_head: Head,
              temperature: float) -> torch.Tensor:
    logp = _log_softmax(head, hidden, temperature)
    with torch.no_grad():
        ref_logp = _log_softmax(ref_head, ref_hidden, temperature)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def _logsumsq_chunk(hidden: torch.Tensor, head: Head, temperature: float) -> torch.Tensor:
    return torch.logsumexp(2 * _log_softmax(head, hidden, temperature), dim=-1)


def chunked_positions(fn: Callable[..., torch.Tensor], tensors: list[torch.Tensor], chunk_size: int,
                      *args: Any) -> torch.Tensor:
    """`fn(*[t[chunk] for t in tensors], *args)` over chunks of the first dimension, concatenated [P];
    each chunk checkpointed under autograd (its [chunk, vocab] logits recomputed in backward)."""
    pieces = []
    for start in range(0, tensors[0].shape[0], chunk_size):
        chunk = [t[start : start + chunk_size] for t in tensors]
        if torch.is_grad_enabled() and any(t.requires_grad for t in chunk):
            pieces.append(checkpoint(fn, *chunk, *args, use_reentrant=False))
        else:
            pieces.append(fn(*chunk, *args))
    return torch.cat(pieces) if pieces else tensors[0].new_zeros(0, dtype=torch.float32)


def _pair_split(values: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """Batch layout of pairs (all chosen rows, then all rejected rows) -> `chosen_<name>`, `rejected_<name>`."""
    n = values.shape[0] // 2
    return {f"chosen_{name}": values[:n], f"rejected_{name}": values[n:]}


def _batch_inputs(ctx: RoundContext, indices: list[int]) -> dict[str, torch.Tensor]:
    from alignpipe.optimization.batching import collate

    return {k: v.to(ctx.device) for k, v in collate(ctx.instances.batch_rows(indices), ctx.pad_id).items()}


@register_provider
class TokenKL(InputProvider):
    """Per-position KL(pi_ref(.|ctx_t) || pi_theta(.|ctx_t)) over the full vocabulary (TDPO, arXiv 2404.11999;
    TIS-DPO token-level variant, arXiv 2410.04350), [B, T] in the trainer layout, 0 off the mask.

    The reference distribution comes from a no-grad forward of the reference for each batch (dropout
    off), its hidden states kept and its logits recomputed chunk by chunk beside the policy's:
    - `ctx.reference_model` when given (full fine-tuning against the frozen base);
    - `reference: base` under an adapter: the adapter disabled (`reference.reference_context`);
    - `reference: round_start`, or no adapter and no reference copy: the trainable parameters as they
      were at `prepare` (a snapshot swapped in with `torch.func.functional_call`, so the policy's live
      parameters and the graph of its forward are untouched; under full fine-tuning the snapshot is a
      copy of the trainable weights);
    - `reference: moving` (TR-DPO): the trainer's shadow weights (`ctx.moving.state()`), read per batch and
      substituted the same way with `functional_call`. `batch()` runs after the policy's forward, whose graph
      saved the live parameters, so swapping the shadow into them (as the trainer does before that forward)
      would break the backward; the functional substitution touches nothing. The shadow a batch sees is the
      one the trainer's own `ref_token_logps` of that batch used (it moves only after optimizer steps).
    """

    name = "token_kl"
    provides = {"pair": frozenset({"chosen_token_kl", "rejected_token_kl"})}

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._snapshot: dict[str, torch.Tensor] | None = None

    def prepare(self, ctx: RoundContext) -> None:
        if ctx.cfg.reference == "moving" and ctx.moving is None:
            raise ValueError("token_kl: optimization.reference 'moving' needs the trainer's MovingReference "
                             "(RoundContext.moving)")
        self._snapshot = None
        if ctx.cfg.reference == "moving":
            return
        if ctx.reference_model is None and (ctx.cfg.reference == "round_start"
                                            or not hasattr(ctx.model, "disable_adapter")):
            self._snapshot = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if p.requires_grad}

    def _reference(self, ctx: RoundContext, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Head]:
        """Reference hidden states [N, L-1, H] (no grad) and a pure reference head."""
        ids, attn = batch["input_ids"], batch["attention_mask"]
        moving = ctx.moving if ctx.cfg.reference == "moving" else None
        if ctx.reference_model is not None and moving is None:
            return last_hidden(ctx.reference_model, ids, attn), output_head(ctx.reference_model)
        head = output_head(ctx.model)
        snapshot = moving.state() if moving is not None else self._snapshot
        if snapshot is not None:
            names = {id(p): n for n, p in ctx.model.named_parameters()}
            head_params = {n: snapshot[names[id(p)]] for n, p in head.named_parameters() if names.get(id(p)) in snapshot}
            ref_head: Head = head if not head_params else (lambda h: functional_call(head, head_params, (h,)))
            return last_hidden(ctx.model, ids, attn, snapshot), ref_head
        with reference_context(ctx.model, ctx.cfg.reference):
            hidden = last_hidden(ctx.model, ids, attn)
        # an adapter on the LM head itself is disabled too: use the layer it wraps
        return hidden, head.get_base_layer() if hasattr(head, "get_base_layer") else head

    def batch(self, ctx: RoundContext, indices: list[int], seq: SequenceLogps, placed: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        if seq.hidden is None:
            raise ValueError("token_kl needs the policy's hidden states (SequenceLogps.hidden)")
        batch = _batch_inputs(ctx, indices)
        mask = seq.mask.bool()
        was_training = ctx.model.training
        ctx.model.eval()
        try:
            with torch.no_grad(), autocast(ctx.cfg, ctx.device):
                ref_hidden, ref_head = self._reference(ctx, batch)
        finally:
            ctx.model.train(was_training)
        if ref_hidden.shape[:2] != mask.shape:
            raise ValueError(f"reference positions {tuple(ref_hidden.shape[:2])} != batch {tuple(mask.shape)}")
        with autocast(ctx.cfg, ctx.device):
            kl = chunked_positions(_kl_chunk, [seq.hidden[mask], ref_hidden[mask]], ctx.cfg.logprob_chunk,
                                   output_head(ctx.model), ref_head, ctx.cfg.temperature)
        token_kl = torch.zeros(mask.shape, dtype=torch.float32, device=kl.device).masked_scatter(mask, kl)
        return _pair_split(token_kl, "token_kl")


@register_provider
class LogSumSq(InputProvider):
    """WPO's alignment term (Zhou et al., arXiv 2406.11827; wzhouad/WPO `get_batch_logps`): per completion,
    S(y) = SUM_t log SUM_v pi_theta(v|ctx_t)^2, computed as logsumexp(2 * log_softmax(logits_t)) from the
    policy's own forward (`seq.hidden`), [B] for chosen and rejected. Detached: `wpo_aligned` uses it only
    inside its no-grad pair weight omega."""

    name = "logsumsq"
    provides = {"pair": frozenset({"chosen_logsumsq", "rejected_logsumsq"})}

    def batch(self, ctx: RoundContext, indices: list[int], seq: SequenceLogps, placed: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        if seq.hidden is None:
            raise ValueError("logsumsq needs the policy's hidden states (SequenceLogps.hidden)")
        mask = seq.mask.bool()
        with torch.no_grad(), autocast(ctx.cfg, ctx.device):
            values = chunked_positions(_logsumsq_chunk, [seq.hidden.detach()[mask]], ctx.cfg.logprob_chunk,
                                       output_head(ctx.model), ctx.cfg.temperature)
        per_token = torch.zeros(mask.shape, dtype=torch.float32, device=values.device).masked_scatter(mask, values)
        return _pair_split(per_token.sum(-1), "logsumsq")
