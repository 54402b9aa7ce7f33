"""`reference: moving` (TR-DPO's soft-updated reference) in input providers: token_kl and selm_sample compute
their reference quantities under the trainer's shadow weights (`RoundContext.moving`), functionally, after the
policy's forward, without breaking its backward.

Checked against plain float64 computations on a copy of the model holding the shadow weights; and through
`optimize()` with a sync every step (the shadow moves between batches), where an in-place swap after the
policy forward would fail in backward.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny import MAX_LENGTH, context, encode_rows, lora, perturb, plain_logp, short_pairs

from alignpipe.config import ObjectiveTerm, OptimizationConfig
from alignpipe.optimization.batching import collate
from alignpipe.optimization.logprobs import sequence_logps
from alignpipe.optimization.providers import PROVIDERS
from alignpipe.optimization.reference import MovingReference
from alignpipe.optimization.trainer import optimize

pytestmark = pytest.mark.usefixtures("one_thread")


def _moving_setup(path, tok, name: str):
    """A perturbed LoRA policy whose shadow is the policy at 'round start', then the policy moved on: the
    reference (shadow), the policy and the base all differ."""
    model = lora(path)
    perturb(model, seed=1)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    mover = MovingReference([p for _, p in named], 0.5, 1, [n for n, _ in named])
    perturb(model, seed=2)  # "training steps" since
    shadow_model = copy.deepcopy(model)
    with torch.no_grad():  # a plain model holding the shadow weights: the reference to compare against
        params = dict(shadow_model.named_parameters())
        for n, r in mover.state().items():
            params[n].copy_(r)
    cfg = OptimizationConfig(objectives=[ObjectiveTerm(name=name)], max_length=MAX_LENGTH, logprob_chunk=5,
                             reference="moving")
    ctx = context(model, tok, short_pairs(sampled=True), cfg, moving=mover)
    return model, shadow_model, ctx


def test_token_kl_under_moving_reference_is_the_kl_to_the_shadow(tiny_model_path, tok):
    model, shadow_model, ctx = _moving_setup(tiny_model_path, tok, "tdpo1")
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    indices = [0, 1, 2]
    batch = collate(ctx.instances.batch_rows(indices), ctx.pad_id)
    provider = PROVIDERS["token_kl"]()
    provider.prepare(ctx)
    model.train()
    seq = sequence_logps(model, **batch, chunk_size=ctx.cfg.logprob_chunk)  # the policy forward comes first
    out = provider.batch(ctx, indices, seq, {})
    got = torch.cat([out["chosen_token_kl"], out["rejected_token_kl"]])

    policy, ref = plain_logp(model, batch), plain_logp(shadow_model, batch)
    mask = seq.mask.double()
    expected = (ref.exp() * (ref - policy)).sum(-1) * mask
    assert expected[mask.bool()].min() > 1e-3  # the shadow differs from the policy
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    with model.disable_adapter():  # and it is not the base either
        base = plain_logp(model, batch)
    assert not torch.allclose((base.exp() * (base - policy)).sum(-1) * mask, expected, atol=1e-3)

    (got.sum() + seq.logps.sum()).backward()  # the policy forward's graph is intact
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)
    assert all(torch.equal(p.detach(), live[n]) for n, p in model.named_parameters())


def test_selm_reference_sample_under_moving_reference(tiny_model_path, tok):
    model, shadow_model, ctx = _moving_setup(tiny_model_path, tok, "selm")
    provider = PROVIDERS["selm_sample"]()
    provider.prepare(ctx)
    indices = [2, 0]
    model.train()
    seq = sequence_logps(model, **collate(ctx.instances.batch_rows(indices), ctx.pad_id))
    out = provider.batch(ctx, indices, seq, {})
    pairs = short_pairs(sampled=True)
    rows = encode_rows(tok, [(pairs[i].prompt, pairs[i].sampled) for i in indices])
    with torch.no_grad():
        expected = sequence_logps(shadow_model.eval(), **rows).logps
        policy = sequence_logps(model.eval(), **rows).logps
    torch.testing.assert_close(out["ref_sampled_logps"], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, policy, atol=1e-3)
    assert out["sampled_logps"].requires_grad and not out["ref_sampled_logps"].requires_grad
    (out["sampled_logps"].sum() + seq.logps.sum()).backward()


@pytest.mark.parametrize("name", ["tdpo1", "selm"])
def test_optimize_with_moving_reference_provider(name, tiny_model_path, tok):
    model = lora(tiny_model_path)
    cfg = OptimizationConfig(objectives=[ObjectiveTerm(name=name)], max_length=MAX_LENGTH, batch_size=2, epochs=3,
                             learning_rate=3e-3, reference="moving", ref_sync_every=1, ref_sync_alpha=0.5)
    metrics = optimize(model, tok, short_pairs(sampled=True) * 2, cfg, seed=0)
    assert metrics["steps"] == 9 and math.isfinite(metrics["loss"])
