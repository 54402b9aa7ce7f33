"""Token-level input providers (providers/token_kl.py, providers/token_weights.py) against plain computations.

The training smoke of the objectives that read them (tdpo1, tdpo2, tisdpo, tisdpo_kl, wpo_aligned) is in
test_training_smoke.py, which picks them up once these providers register.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import MAX_LENGTH, context, lora, perturb, plain_logp, short_pairs

from alignpipe.config import ObjectiveTerm, OptimizationConfig, load_recipe
from alignpipe.models import load_policy
from alignpipe.optimization.batching import collate
from alignpipe.optimization.logprobs import sequence_logps
from alignpipe.optimization.providers import PROVIDERS, provided
from alignpipe.optimization.providers.token_weights import TokenWeightOptions

pytestmark = pytest.mark.usefixtures("one_thread")


def _lora(path, perturbed: bool = True):
    model = lora(path)
    if perturbed:
        perturb(model, seed=1)
    return model


def _setup(model, tok, cfg: OptimizationConfig, reference_model=None):
    ctx = context(model, tok, short_pairs(), cfg, reference_model)
    indices = list(range(len(ctx.instances.examples)))
    batch = collate(ctx.instances.batch_rows(indices), tok.pad_token_id)
    return ctx, indices, batch


def _seq(model, batch, cfg: OptimizationConfig):
    model.train()
    return sequence_logps(model, **batch, temperature=cfg.temperature, chunk_size=cfg.logprob_chunk)


def _cfg(name: str, **kw) -> OptimizationConfig:
    return OptimizationConfig(objectives=[ObjectiveTerm(name=name)], max_length=MAX_LENGTH, logprob_chunk=5, **kw)


def _kl(provider_out: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([provider_out["chosen_token_kl"], provider_out["rejected_token_kl"]])


def test_pair_names_are_provided():
    names = {"chosen_token_kl", "rejected_token_kl", "chosen_logsumsq", "rejected_logsumsq",
             "chosen_token_weights", "rejected_token_weights"}
    assert names <= provided("pair")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_kl_matches_full_softmax_under_lora(temperature, tiny_model_path, tok):
    model = _lora(tiny_model_path)
    cfg = _cfg("tdpo1", temperature=temperature)
    ctx, indices, batch = _setup(model, tok, cfg)
    provider = PROVIDERS["token_kl"]()
    provider.prepare(ctx)
    seq = _seq(model, batch, cfg)
    got = _kl(provider.batch(ctx, indices, seq, {}))

    policy = plain_logp(model, batch, temperature)
    with model.disable_adapter():
        ref = plain_logp(model, batch, temperature)
    mask = seq.mask.double()
    expected = (ref.exp() * (ref - policy)).sum(-1) * mask
    assert got.shape == seq.mask.shape and got.dtype == torch.float32
    assert expected[mask.bool()].min() > 1e-3  # the perturbation made the policy differ everywhere
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    assert torch.all(got[~seq.mask.bool()] == 0)

    got.sum().backward()  # differentiable through pi_theta: reaches the adapter
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_token_kl_is_zero_when_policy_is_reference(tiny_model_path, tok):
    model = _lora(tiny_model_path, perturbed=False)  # LoRA B = 0: adapter on == adapter off
    cfg = _cfg("tdpo2")
    ctx, indices, batch = _setup(model, tok, cfg)
    provider = PROVIDERS["token_kl"]()
    provider.prepare(ctx)
    got = _kl(provider.batch(ctx, indices, _seq(model, batch, cfg), {}))
    torch.testing.assert_close(got, torch.zeros_like(got), rtol=0, atol=1e-6)


def test_token_kl_round_start_reference_is_the_snapshot(tiny_model_path, tok):
    """reference: round_start - the policy as it was at prepare(), even after its weights moved."""
    model = _lora(tiny_model_path)
    cfg = _cfg("tdpo1", reference="round_start")
    ctx, indices, batch = _setup(model, tok, cfg)
    provider = PROVIDERS["token_kl"]()
    provider.prepare(ctx)
    start = copy.deepcopy(model)
    perturb(model, seed=2)  # "training steps" after the round started
    seq = _seq(model, batch, cfg)
    got = _kl(provider.batch(ctx, indices, seq, {}))
    policy, ref = plain_logp(model, batch), plain_logp(start, batch)
    expected = (ref.exp() * (ref - policy)).sum(-1) * seq.mask.double()
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    got.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


def test_token_kl_full_finetuning_reference_model(tiny_model_path, tok):
    """No adapter: the frozen copy passed as `reference_model` is the reference; gradient reaches the policy."""
    reference = load_policy(tiny_model_path).eval().requires_grad_(False)
    model = load_policy(tiny_model_path)
    perturb(model, seed=3, scale=0.05)
    cfg = _cfg("tdpo1", adapter=None)
    ctx, indices, batch = _setup(model, tok, cfg, reference_model=reference)
    provider = PROVIDERS["token_kl"]()
    provider.prepare(ctx)
    seq = _seq(model, batch, cfg)
    got = _kl(provider.batch(ctx, indices, seq, {}))
    policy, ref = plain_logp(model, batch), plain_logp(reference, batch)
    expected = (ref.exp() * (ref - policy)).sum(-1) * seq.mask.double()
    assert expected[seq.mask.bool()].min() > 1e-4
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    got.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_logsumsq_matches_naive(tiny_model_path, tok):
    model = _lora(tiny_model_path)
    cfg = _cfg("wpo_aligned")
    ctx, indices, batch = _setup(model, tok, cfg)
    provider = PROVIDERS["logsumsq"]()
    provider.prepare(ctx)
    seq = _seq(model, batch, cfg)
    out = provider.batch(ctx, indices, seq, {})
    got = torch.cat([out["chosen_logsumsq"], out["rejected_logsumsq"]])

    logp = plain_logp(model, batch)
    per_token = torch.log((logp.exp() ** 2).sum(-1))  # log SUM_v pi(v|ctx)^2
    expected = (per_token * seq.mask.double()).sum(-1)
    assert got.shape == (2 * len(indices),) and not got.requires_grad  # wpo_aligned reads it detached
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)


def _plain_weights(scores: torch.Tensor, low=-1.5, high=1.5, w_min=0.7, w_max=1.3) -> torch.Tensor:
    clipped = torch.clamp(scores, low, high)
    return w_min + (clipped - low) / (high - low) * (w_max - w_min)


@pytest.mark.parametrize("transform", ["threshold_and_scale", "exp"])
def test_token_weights_from_contrastive_models(transform, tiny_model_path, tok, tmp_path):
    """pi+ = a saved adapter (path), pi- = a saved full model (path); the policy plays no part."""
    positive = _lora(tiny_model_path)
    positive.save_pretrained(tmp_path / "positive")
    negative = load_policy(tiny_model_path)
    perturb(negative, seed=4, scale=0.1)
    negative.save_pretrained(tmp_path / "negative")

    options = {"positive": str(tmp_path / "positive"), "negative": str(tmp_path / "negative"),
               "transform": transform, "mu": 0.5, "k": 0.9, "low": -1.0, "high": 1.25}
    cfg = _cfg("tisdpo", inputs={"tisdpo_weights": options})
    policy = _lora(tiny_model_path, perturbed=False)
    ctx, indices, batch = _setup(policy, tok, cfg)
    provider = PROVIDERS["tisdpo_weights"](TokenWeightOptions(**options))
    provider.prepare(ctx)
    seq = _seq(policy, batch, cfg)
    out = provider.batch(ctx, indices, seq, {})

    with torch.no_grad():
        pos = sequence_logps(positive.eval(), **batch).token_logps.double()
        neg = sequence_logps(negative.eval(), **batch).token_logps.double()
    n = len(indices)
    scores = torch.cat([pos[:n] - neg[:n], neg[n:] - pos[n:]])  # d^w on chosen rows, d^l on rejected rows
    if transform == "exp":
        expected = 0.9 * torch.exp(0.5 * scores.clamp(-1.0, 1.25))
    else:
        expected = _plain_weights(scores, low=-1.0, high=1.25)
    expected = expected * seq.mask.double()
    got = torch.cat([out["chosen_token_weights"], out["rejected_token_weights"]])
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    mask = seq.mask.bool()
    assert scores[mask].abs().max() > 0.05  # the two models do disagree
    if transform == "threshold_and_scale":
        assert got[mask].min() >= 0.7 - 1e-6 and got[mask].max() <= 1.3 + 1e-6


def test_token_weights_defaults_policy_vs_reference(tiny_model_path, tok):
    """Without paths: pi+ = the policy at round start, pi- = the reference (adapter disabled); fixed for the round."""
    model = _lora(tiny_model_path)
    start = copy.deepcopy(model)
    cfg = _cfg("tisdpo")
    ctx, _, _ = _setup(model, tok, cfg)
    provider = PROVIDERS["tisdpo_weights"]()
    provider.prepare(ctx)
    perturb(model, seed=5)  # later steps do not change the round's weights
    indices = [2, 0]  # a batch in another order than the examples
    rows = collate(ctx.instances.batch_rows(indices), tok.pad_token_id)
    out = provider.batch(ctx, indices, _seq(model, rows, cfg), {})

    with torch.no_grad():
        pos = sequence_logps(start.eval(), **rows)
        with start.disable_adapter():
            neg = sequence_logps(start, **rows)
    n = len(indices)
    d = pos.token_logps.double() - neg.token_logps.double()
    scores = torch.cat([d[:n], -d[n:]])
    assert scores[pos.mask.bool()].abs().max() > 0.05
    expected = _plain_weights(scores) * pos.mask.double()
    got = torch.cat([out["chosen_token_weights"], out["rejected_token_weights"]])
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)


def test_token_weight_options_validate():
    with pytest.raises(ValueError, match="low"):
        TokenWeightOptions(low=1.0, high=-1.0)
    with pytest.raises(ValueError, match="unknown input provider|Extra inputs"):
        OptimizationConfig(inputs={"tisdpo_weights": {"lo": 1.0}})


@pytest.mark.parametrize("name", ["tdpo1", "tdpo2", "tisdpo", "tisdpo_kl", "wpo_aligned"])
def test_recipe_with_token_objective_loads(name):
    recipe = load_recipe(None, {"optimization.objectives": [{"name": name}],
                                "optimization.inputs": {"tisdpo_weights": {"w_min": 0.5, "w_max": 1.5}}})
    assert [t.name for t in recipe.optimization.objectives] == [name]
