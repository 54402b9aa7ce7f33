"""Provider state across a run: heads resume from the last finished round's checkpoint, and a head's own
learning rate (a separate AdamW parameter group) sets its step size.

Checked: a 2-round PPO loop interrupted after round 0 starts round 1 with exactly the value head saved at
round 0 (not a fresh one); a first Adam step moves a reward head's weights by ~its `learning_rate`
(Adam's first update is lr * g / (|g| + eps) = ~lr * sign(g)), the LoRA weights by ~the policy's.
"""

from __future__ import annotations

import pytest
import torch
from tiny import arithmetic_pairs, digit_prompts, lora

from alignpipe.config import ObjectiveTerm, OptimizationConfig, Recipe
from alignpipe.models import load_tokenizer
from alignpipe.optimization.providers.heads import RewardHead, ValueHead
from alignpipe.optimization.trainer import optimize

pytestmark = pytest.mark.usefixtures("one_thread")


def _ppo_recipe(tmp_path, tiny_model_path, rounds: int) -> Recipe:
    prompts = digit_prompts(tmp_path / "prompts.jsonl", 40)
    return Recipe.model_validate({
        "name": "resume_ppo", "model": str(tiny_model_path), "rounds": rounds, "output_dir": str(tmp_path / "runs"),
        "task": {"kind": "file", "path": str(prompts), "heldout_fraction": 0.25},
        "synthesis": {"prompts_per_round": 4, "samples_per_prompt": 4, "max_new_tokens": 4, "temperature": 1.0},
        "instantiation": {"kind": "group", "drop_uniform_groups": False},
        "optimization": {"objectives": [{"name": "ppo"}], "batch_size": 4, "learning_rate": 1e-2,
                         "adapter": {"r": 4, "alpha": 8}, "inputs": {"value_head": {"init_std": 0.2}}},
        "heldout": {"n": 2, "max_new_tokens": 4},
    })


def test_resumed_run_starts_the_next_round_from_the_saved_head(tmp_path, tiny_model_path, monkeypatch):
    from safetensors.torch import load_file

    from alignpipe.loop import run

    # A run stopped after round 0 (its checkpoint, head and metrics written; round 1 never started): the
    # fingerprints do not cover `rounds`, so the 2-round run below finds round 0 done and skips it.
    run(_ppo_recipe(tmp_path, tiny_model_path, rounds=1))
    rd0 = tmp_path / "runs" / "resume_ppo" / "round-00"
    saved = load_file(str(rd0 / "checkpoint" / "value_head.safetensors"))
    assert not (tmp_path / "runs" / "resume_ppo" / "round-01").exists()

    at_start = []
    real = ValueHead.prepare

    def recording(self, ctx):
        at_start.append({k: v.detach().clone() for k, v in self.heads.state_dict().items()})
        return real(self, ctx)

    monkeypatch.setattr(ValueHead, "prepare", recording)
    summary = run(_ppo_recipe(tmp_path, tiny_model_path, rounds=2))
    assert len(summary["rounds"]) == 2 and summary["rounds"][1]["train"]["steps"] > 0
    (head,) = at_start  # round 1 only: round 0 was read back
    assert set(head) == {"value.weight", "value.bias"}
    assert saved["value.weight"].abs().sum() > 0  # init_std 0.2: a fresh head would be a different draw
    for key, value in saved.items():
        assert torch.equal(head[key], value), key


@pytest.mark.parametrize("head_lr", [None, 3e-2])
def test_head_learning_rate_sets_its_first_adam_step(head_lr, tiny_model_path, monkeypatch):
    tok = load_tokenizer(tiny_model_path)
    model = lora(tiny_model_path, r=4, alpha=8)
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    initial = []
    real = RewardHead.prepare

    def recording(self, ctx):
        real(self, ctx)
        initial.append(self.heads["reward"].weight.detach().clone())

    monkeypatch.setattr(RewardHead, "prepare", recording)
    policy_lr = 1e-3
    # a non-zero head: through a zero one no gradient reaches the trunk (dL/dh = w dL/dr)
    options = {"init_std": 0.1} if head_lr is None else {"init_std": 0.1, "learning_rate": head_lr}
    cfg = OptimizationConfig(objectives=[ObjectiveTerm(name="bt_reward")], learning_rate=policy_lr, batch_size=8,
                             max_length=64, inputs={"reward_head": options})
    providers: list = []
    assert optimize(model, tok, arithmetic_pairs(tok), cfg, seed=0, providers=providers)["steps"] == 1
    step = (providers[0].heads["reward"].weight.detach() - initial[0]).abs()
    expected = head_lr or policy_lr
    assert step.max().item() == pytest.approx(expected, rel=1e-3)
    assert step.median().item() > 0.9 * expected  # ~lr on (almost) every coordinate, whatever |g| is
    moved = max((p.detach() - lora_b[n]).abs().max().item() for n, p in model.named_parameters() if n in lora_b)
    assert moved == pytest.approx(policy_lr, rel=1e-3)  # the policy's group keeps the policy's rate
