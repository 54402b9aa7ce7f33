"""Scalar-head providers (`providers/heads.py`): the PPO value head and the reward head, on the tiny Llama.

Checked: values are the head applied to the policy's hidden state at the position predicting each completion
token (float64, by hand); old values equal values at the first step; the head gets a gradient; a
Bradley-Terry head reaches high train accuracy through `optimize()`, a regression head's loss falls, PPO
trains with its critic (the value loss falls); cost heads exist only when read; saved heads reload to the same outputs; a frozen policy
trains the head alone; recipes naming ppo / bt_reward / regression_reward load.
"""

from __future__ import annotations

import pytest
import torch
from tiny import (
    MAX_LENGTH,
    PROBLEMS,
    arithmetic_groups,
    arithmetic_pairs,
    context,
    digit_prompts,
    lora,
    prompt,
)

import alignpipe.optimization.trainer as trainer
from alignpipe.config import ObjectiveTerm, OptimizationConfig, load_recipe
from alignpipe.models import load_policy
from alignpipe.optimization.batching import collate
from alignpipe.optimization.logprobs import sequence_logps
from alignpipe.optimization.providers import RoundContext
from alignpipe.optimization.providers.heads import HeadOptions, RewardHead, ValueHead, apply_head
from alignpipe.optimization.scoring import autocast
from alignpipe.optimization.trainer import optimize
from alignpipe.records import GroupExample, PointExample

pytestmark = pytest.mark.usefixtures("one_thread")


def _points(tok) -> list[PointExample]:
    return [PointExample(prompt=prompt(tok, a, b), completion=f"it is {a + b + off}", score=score, label=score > 0.5)
            for a, b in PROBLEMS[:4] for off, score in ((0, 1.0), (11, 0.0), (1, 0.5))]


def _groups(tok) -> list[GroupExample]:
    return arithmetic_groups(tok, lambda s: [f"it is {s}", f"it is {s + 1} or so", f"it is {s + 10}",
                                             f"no idea {s + 21}"])


def _cfg(name: str, **kw) -> OptimizationConfig:
    kw.setdefault("max_length", MAX_LENGTH)
    return OptimizationConfig(objectives=[ObjectiveTerm(name=name)], **kw)


def _forward(ctx: RoundContext, indices: list[int], grad: bool = False):
    batch = collate(ctx.instances.batch_rows(indices), ctx.pad_id)
    with torch.set_grad_enabled(grad):
        return batch, sequence_logps(ctx.model, **batch)


def _recording(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Record the tensors of each step (around the trainer's `combined_loss`)."""
    seen: list[dict[str, torch.Tensor]] = []
    real = trainer.combined_loss

    def recording(terms, tensors):
        seen.append({k: v.detach().clone() for k, v in tensors.items()})
        return real(terms, tensors)

    monkeypatch.setattr(trainer, "combined_loss", recording)
    return seen


# --- value head ------------------------------------------------------------------------------------------

def test_values_are_the_head_on_the_hidden_state_predicting_each_token(tiny_model_path, tok):
    model = load_policy(tiny_model_path)
    groups = _groups(tok)
    cfg = _cfg("ppo")
    ctx = context(model, tok, groups, cfg)
    torch.manual_seed(1)
    provider = ValueHead(HeadOptions(init_std=0.2))
    provider.prepare(ctx)
    head = provider.heads["value"]
    with torch.no_grad():
        head.bias.fill_(0.3)
    batch, seq = _forward(ctx, [1, 2])
    values = provider.batch(ctx, [1, 2], seq, {})["values"]

    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   output_hidden_states=True).hidden_states[-1].double()  # [N, L, H]
    w, b = head.weight.detach().double()[0], head.bias.detach().double()[0]
    completion = batch["completion_mask"]
    assert values.shape == (8, completion.shape[1] - 1)
    for n in range(values.shape[0]):
        for t in range(values.shape[1]):
            # position t holds the state that predicts token t+1: a value where token t+1 is a completion token
            expected = hidden[n, t] @ w + b if completion[n, t + 1] else torch.zeros((), dtype=torch.float64)
            assert abs(values[n, t].double() - expected).item() < 1e-5, (n, t)
    assert int((values != 0).sum()) == int(completion[:, 1:].sum())


def test_old_values_equal_values_at_the_first_step(tiny_model_path, tok, monkeypatch):
    model = lora(tiny_model_path)
    groups = _groups(tok)
    seen = _recording(monkeypatch)
    providers: list = []
    cfg = _cfg("ppo", learning_rate=1e-2, batch_size=2, epochs=2, inputs={"value_head": {"init_std": 0.2}})
    optimize(model, tok, groups, cfg, seed=0, providers=providers)
    first, last = seen[0], seen[-1]
    mask = first["completion_mask"].bool()
    assert first["values"].abs().sum() > 0
    torch.testing.assert_close(first["values"], first["old_values"], atol=1e-5, rtol=0)
    torch.testing.assert_close(first["old_token_logps"][mask], first["token_logps"][mask], atol=1e-5, rtol=0)
    assert not torch.allclose(last["values"], last["old_values"], atol=1e-4)  # the head moved, old ones did not
    assert [type(p) for p in providers] == [ValueHead]


def test_value_head_gets_a_gradient(tiny_model_path, tok):
    model = lora(tiny_model_path)
    ctx = context(model, tok, _groups(tok), _cfg("ppo"))
    provider = ValueHead()  # zero init: the gradient w.r.t. w is still SUM dL/dV_t h_t
    provider.prepare(ctx)
    _, seq = _forward(ctx, [0, 3], grad=True)
    out = provider.batch(ctx, [0, 3], seq, {})
    assert out["old_values"].abs().sum() == 0 and not out["old_values"].requires_grad
    ((out["values"] - 1.0) ** 2 * seq.mask).sum().backward()
    head = provider.heads["value"]
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert head.bias.grad.abs().item() > 0
    assert [p for p in provider.parameters()] == [head.weight, head.bias]


def test_cost_head_only_when_read(tiny_model_path, tok):
    model = load_policy(tiny_model_path)
    provider = ValueHead()
    provider.prepare(context(model, tok, _groups(tok), _cfg("ppo")))
    assert set(provider.heads) == {"value"}
    provider.prepare(context(model, tok, _groups(tok), _cfg("safe_rlhf")))
    assert set(provider.heads) == {"value", "cost"}
    ctx = context(model, tok, _groups(tok), _cfg("safe_rlhf"))
    _, seq = _forward(ctx, [0])
    out = provider.batch(ctx, [0], seq, {})
    assert set(out) == {"values", "old_values", "cost_values", "old_cost_values"}
    assert out["cost_values"].shape == seq.mask.shape


def test_ppo_trains_with_its_critic(tiny_model_path, tok, monkeypatch):
    model = lora(tiny_model_path)
    groups = _groups(tok)
    providers: list = []
    cfg = _cfg("ppo", learning_rate=3e-3, batch_size=4, epochs=4)
    rounds = [optimize(model, tok, groups, cfg, seed=s, providers=providers) for s in range(5)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rounds), rounds
    value_losses = [r["ppo/value_loss"] for r in rounds]
    assert value_losses[-1] < 0.5 * value_losses[0], value_losses
    assert len(providers) == 1  # the head was kept across rounds, not rebuilt


def test_bf16_autocast_keeps_the_head_in_float32(tiny_model_path, tok):
    model = load_policy(tiny_model_path)
    cfg = _cfg("ppo", precision="bf16")
    ctx = context(model, tok, _groups(tok), cfg)
    provider = ValueHead(HeadOptions(init_std=0.2))
    provider.prepare(ctx)
    batch = collate(ctx.instances.batch_rows([0]), ctx.pad_id)
    with autocast(cfg, torch.device("cpu")):
        seq = sequence_logps(model, **batch)
    out = provider.batch(ctx, [0], seq, {})
    assert out["values"].dtype == out["old_values"].dtype == torch.float32
    assert provider.heads["value"].weight.dtype == torch.float32
    with autocast(cfg, torch.device("cpu")):  # inside autocast, on bf16 hidden: cast up, not down
        got = apply_head(provider.heads["value"], seq.hidden.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, apply_head(provider.heads["value"], seq.hidden.bfloat16().float()))


# --- reward head -----------------------------------------------------------------------------------------

@torch.no_grad()
def _pair_rewards(model, tok, provider: RewardHead, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    ctx = context(model.eval(), tok, pairs, _cfg("bt_reward"))
    indices = list(range(len(pairs)))
    _, seq = _forward(ctx, indices)
    out = provider.batch(ctx, indices, seq, {})
    return out["chosen_rewards"], out["rejected_rewards"]


def test_reward_is_the_head_at_the_last_completion_position(tiny_model_path, tok):
    model = load_policy(tiny_model_path)
    pairs = arithmetic_pairs(tok)[:3]
    torch.manual_seed(2)
    provider = RewardHead(HeadOptions(init_std=0.2))
    ctx = context(model, tok, pairs, _cfg("bt_reward"))
    provider.prepare(ctx)
    batch, seq = _forward(ctx, [0, 1, 2])
    out = provider.batch(ctx, [0, 1, 2], seq, {})
    rewards = torch.cat([out["chosen_rewards"], out["rejected_rewards"]])
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   output_hidden_states=True).hidden_states[-1].double()
    head = provider.heads["reward"]
    for n in range(6):
        ids = batch["completion_mask"][n].nonzero().flatten()
        t = int(ids[-1]) - 1  # the position whose target is the last completion token (EOS)
        assert batch["input_ids"][n, t + 1] == tok.eos_token_id
        expected = hidden[n, t] @ head.weight.detach().double()[0] + head.bias.detach().double()[0]
        assert abs(rewards[n].double() - expected).item() < 1e-5, n


def test_cost_head_only_when_read_for_pairs(tiny_model_path, tok):
    model = load_policy(tiny_model_path)
    pairs = arithmetic_pairs(tok)[:2]
    provider = RewardHead(HeadOptions(init_std=0.2))
    ctx = context(model, tok, pairs, _cfg("safe_rlhf_cost"))
    provider.prepare(ctx)
    assert set(provider.heads) == {"cost"}
    _, seq = _forward(ctx, [0, 1])
    out = provider.batch(ctx, [0, 1], seq, {})
    assert set(out) == {"chosen_costs", "rejected_costs"} and out["chosen_costs"].shape == (2,)
    torch.testing.assert_close(torch.cat([out["chosen_costs"], out["rejected_costs"]]), provider.rewards(seq, key="cost"))


def test_bt_reward_head_learns_the_pairs(tiny_model_path, tok, monkeypatch):
    model = lora(tiny_model_path)
    pairs = arithmetic_pairs(tok)
    providers: list = []
    seen = _recording(monkeypatch)
    cfg = _cfg("bt_reward", learning_rate=3e-3, batch_size=8, epochs=30)
    metrics = optimize(model, tok, pairs, cfg, seed=0, providers=providers)
    assert metrics["steps"] == 30
    (provider,) = providers
    assert isinstance(provider, RewardHead)
    gaps = [(s["chosen_rewards"] - s["rejected_rewards"]) for s in seen]
    first = torch.nn.functional.logsigmoid(gaps[0]).mean().neg().item()
    last = torch.nn.functional.logsigmoid(gaps[-1]).mean().neg().item()
    assert last < first - 0.3, (first, last)
    chosen, rejected = _pair_rewards(model, tok, provider, pairs)
    assert (chosen > rejected).float().mean().item() >= 0.875, (chosen, rejected)
    assert (chosen - rejected).mean().item() > 2.0, (chosen, rejected)


def test_frozen_policy_trains_the_reward_head_alone(tiny_model_path, tok):
    model = load_policy(tiny_model_path).requires_grad_(False)
    before = {n: p.clone() for n, p in model.named_parameters()}
    providers: list = []
    cfg = _cfg("bt_reward", learning_rate=3e-2, batch_size=8, epochs=20)
    optimize(model, tok, arithmetic_pairs(tok), cfg, seed=0, providers=providers)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    head = providers[0].heads["reward"]
    assert head.weight.abs().sum() > 0
    chosen, rejected = _pair_rewards(model, tok, providers[0], arithmetic_pairs(tok))
    assert (chosen > rejected).float().mean().item() >= 0.75, (chosen, rejected)


def test_regression_reward_head_loss_falls(tiny_model_path, tok):
    model = lora(tiny_model_path)
    points = _points(tok)
    providers: list = []
    cfg = _cfg("regression_reward", learning_rate=3e-3, batch_size=len(points), epochs=10)
    losses = [optimize(model, tok, points, cfg, seed=s, providers=providers)["loss"] for s in range(4)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert [type(p) for p in providers] == [RewardHead]


def test_saved_heads_reload_to_the_same_outputs(tiny_model_path, tok, tmp_path):
    model = load_policy(tiny_model_path)
    torch.manual_seed(3)
    for cls, examples, name in ((ValueHead, _groups(tok), "safe_rlhf"), (RewardHead, arithmetic_pairs(tok), "bt_reward")):
        ctx = context(model, tok, examples, _cfg(name))
        provider = cls(HeadOptions(init_std=0.3))
        provider.prepare(ctx)
        provider.save(tmp_path)
        assert (tmp_path / f"{cls.name}.safetensors").is_file()
        _, seq = _forward(ctx, [0, 1])
        expected = provider.batch(ctx, [0, 1], seq, {})

        reloaded = cls()
        assert reloaded.load(tmp_path)
        reloaded.prepare(ctx)
        got = reloaded.batch(ctx, [0, 1], seq, {})
        assert got.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], atol=0, rtol=0)
        via_option = cls(HeadOptions(init_from=str(tmp_path)))  # the same through the recipe option
        via_option.prepare(ctx)
        torch.testing.assert_close(via_option.batch(ctx, [0, 1], seq, {}), expected, atol=0, rtol=0)
    value = ValueHead(HeadOptions(init_from=str(tmp_path / "reward_head.safetensors")))  # critic from the RM
    value.prepare(context(model, tok, _groups(tok), _cfg("ppo")))
    assert torch.equal(value.heads["value"].weight, reloaded.heads["reward"].weight)


def test_recipes_with_head_objectives_load():
    ppo = load_recipe(None, {"instantiation.kind": "group", "optimization.objectives": [{"name": "ppo"}],
                             "optimization.inputs": {"value_head": {"init_std": 0.01}}})
    assert ppo.optimization.objectives[0].name == "ppo"
    assert load_recipe(None, {"optimization.objectives": [{"name": "bt_reward"}]}).instantiation.kind == "pair"
    point = load_recipe(None, {"instantiation.kind": "point",
                               "optimization.objectives": [{"name": "regression_reward"}]})
    assert point.optimization.objectives[0].name == "regression_reward"


def test_ppo_loop_keeps_and_saves_the_value_head(tmp_path, tiny_model_path, monkeypatch):
    """Two loop rounds of group PPO: the loop keeps one provider, and each checkpoint holds its head."""

    from safetensors.torch import load_file

    from alignpipe.config import Recipe
    from alignpipe.loop import run

    prompts = digit_prompts(tmp_path / "prompts.jsonl", 40)
    recipe = Recipe.model_validate({
        "name": "tiny_ppo", "model": str(tiny_model_path), "rounds": 2, "output_dir": str(tmp_path / "runs"),
        "task": {"kind": "file", "path": str(prompts), "heldout_fraction": 0.25},
        "synthesis": {"prompts_per_round": 8, "samples_per_prompt": 6, "max_new_tokens": 6, "temperature": 1.0},
        "instantiation": {"kind": "group", "drop_uniform_groups": False},
        "optimization": {"objectives": [{"name": "ppo"}], "batch_size": 4, "learning_rate": 1e-2,
                         "adapter": {"r": 4, "alpha": 8}},
        "heldout": {"n": 4, "max_new_tokens": 6},
    })
    prepared = []
    real = ValueHead.prepare

    def recording(self, ctx):
        prepared.append(self)
        return real(self, ctx)

    monkeypatch.setattr(ValueHead, "prepare", recording)
    summary = run(recipe)
    assert all(r["train"]["steps"] > 0 for r in summary["rounds"])
    assert len(prepared) == 2 and prepared[0] is prepared[1]  # one head, kept across rounds
    run_dir = tmp_path / "runs" / "tiny_ppo"
    heads = [load_file(str(run_dir / f"round-{r:02d}" / "checkpoint" / "value_head.safetensors")) for r in (0, 1)]
    assert set(heads[0]) == {"value.weight", "value.bias"} and heads[0]["value.weight"].shape == (1, 64)
    # round 0 may see only zero rewards (and zero KL: the policy starts at the reference), so a zero-init
    # head can stay at zero there; by the end some reward has reached it
    assert heads[1]["value.weight"].abs().sum() > 0
