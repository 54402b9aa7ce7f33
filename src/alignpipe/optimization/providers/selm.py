"""SELM's reference sample log-probs (Zhang et al., arXiv 2405.19332; methods.md 1.22).

L = -logsig(beta h) + alpha * beta * ( logp_theta(y_ref) - logp_ref(y_ref) ),  y_ref ~ pi_ref(.|x)

`sampled_logps` [B] is logp_theta(y_ref | x), a token sum with gradient, from one extra policy forward over the
batch's sampled rows; `ref_sampled_logps` [B] is the same under the reference, computed once per round in
`prepare` exactly as the trainer computes the reference log-probs of chosen / rejected (a frozen copy under
full fine-tuning, else `reference.reference_context`).

y_ref is `PairExample.sampled`: instantiation draws it uniformly from the prompt's candidates, which are samples
of the round-start policy (the "previous iterate" SELM's reference is). Pairs without one (offline data, whose
responses are not policy samples) fail in `prepare` with a message. Under `reference: moving` (TR-DPO) there is
no fixed reference to precompute against: `ref_sampled_logps` is computed per batch under the trainer's shadow
weights (`ctx.moving.call`, a functional substitution that leaves the policy's forward graph intact), no grad.
"""

from __future__ import annotations

import torch

from alignpipe import AlignpipeError
from alignpipe.optimization.batching import collate, encode
from alignpipe.optimization.logprobs import SequenceLogps, sequence_logps
from alignpipe.optimization.providers import InputProvider, RoundContext, register_provider
from alignpipe.optimization.scoring import autocast, reference_logps


@register_provider
class SelmSample(InputProvider):
    """Policy (with gradient) and reference token-sum log-probs of each pair's reference sample y_ref."""

    name = "selm_sample"
    provides = {"pair": frozenset({"sampled_logps", "ref_sampled_logps"})}

    def prepare(self, ctx: RoundContext) -> None:
        examples = ctx.instances.examples
        if any(e.sampled is None for e in examples):
            raise AlignpipeError("sampled_logps: pair examples carry no `sampled` response (a policy sample for the "
                                 "prompt); the loop adds one from synthesis.backend 'transformers' candidates")
        self.rows = [encode(ctx.tokenizer, e.prompt, e.sampled, e.sampled_truncated, ctx.cfg.max_length)
                     for e in examples]
        self.ref_logps = None
        if ctx.cfg.reference == "moving":
            if ctx.moving is None:
                raise AlignpipeError("sampled_logps: optimization.reference 'moving' needs the trainer's "
                                     "MovingReference (RoundContext.moving)")
            return  # per batch, under the shadow weights as they are then
        ref = reference_logps(ctx.model, self.rows, ctx.pad_id, ctx.cfg, "reference sample log-probs",
                              ctx.reference_model)
        self.ref_logps = torch.stack([values.sum() for values in ref]).float()

    def batch(self, ctx: RoundContext, indices: list[int], seq: SequenceLogps, placed: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        device = seq.logps.device
        batch = {k: v.to(device) for k, v in collate([self.rows[i] for i in indices], ctx.pad_id).items()}
        kwargs = {**batch, "temperature": ctx.cfg.temperature, "chunk_size": ctx.cfg.logprob_chunk}
        with autocast(ctx.cfg, device):
            sampled = sequence_logps(ctx.model, **kwargs)
        if self.ref_logps is not None:
            return {"sampled_logps": sampled.logps, "ref_sampled_logps": self.ref_logps[indices].to(device)}
        was_training = ctx.model.training
        ctx.model.eval()  # as the precomputed references (completion_logps): dropout off
        try:
            with torch.no_grad(), autocast(ctx.cfg, device):
                ref = ctx.moving.call(ctx.model, sequence_logps, **kwargs).logps
        finally:
            ctx.model.train(was_training)
        return {"sampled_logps": sampled.logps, "ref_sampled_logps": ref.float()}
