"""Multi-objective methods: weighted scalarisation, Safe-RLHF (PPO-Lagrangian), MODPO (methods.md 6.1-6.3).

Pure helpers for the parts that live outside one loss call (reward scalarisation before advantages,
the Lagrange multiplier update between steps) plus the registered losses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from alignpipe.optimization.objectives import Metrics, register
from alignpipe.optimization.objectives.groupwise import group_advantages
from alignpipe.optimization.objectives.pairwise import _pair_metrics
from alignpipe.optimization.objectives.rl import (
    _token_level,
    clipped_surrogate,
    clipped_value_loss,
    gae,
    shaped_rewards,
)


def weighted_rewards(rewards: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """r_w = SUM_k w_k r_k over the last axis: [..., M] -> [...] (weights on the simplex by convention)."""
    w = torch.as_tensor(list(weights), dtype=rewards.dtype, device=rewards.device)
    if w.numel() != rewards.shape[-1]:
        raise ValueError(f"{w.numel()} weights for {rewards.shape[-1]} reward components")
    return (rewards * w).sum(dim=-1)


def multi_reward_advantages(
    rewards: torch.Tensor,
    weights: Sequence[float],
    mode: str = "sum_then_normalize",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Group advantages from M reward components (TRL GRPO `multi_objective_aggregation`; GDPO arXiv 2601.05242).

    rewards [G, K, M] -> advantages [G, K], detached.
    sum_then_normalize: group_advantages( SUM_m w_m r_m )
    normalize_then_sum: a = SUM_m w_m group_advantages(r_m), then (a - mean(a)) / (std(a) + eps) over the batch.
    """
    if mode == "sum_then_normalize":
        return group_advantages(weighted_rewards(rewards, weights), eps=eps)
    if mode == "normalize_then_sum":
        per = torch.stack([group_advantages(rewards[..., m], eps=eps) for m in range(rewards.shape[-1])], dim=-1)
        total = weighted_rewards(per, weights)
        return ((total - total.mean()) / (total.std() + eps)).detach()
    raise ValueError(f"unknown mode {mode!r}; use 'sum_then_normalize' or 'normalize_then_sum'")


def safe_rlhf_advantages(reward_adv: torch.Tensor, cost_adv: torch.Tensor, lagrange_lambda: float) -> torch.Tensor:
    """Safe-RLHF actor advantage: A = (A^R - lambda A^C) / (1 + lambda)."""
    return (reward_adv - lagrange_lambda * cost_adv) / (1 + lagrange_lambda)


def lagrange_update(
    log_lambda: float,
    episode_cost: float,
    threshold: float = 0.0,
    lr: float = 0.1,
    lambda_max: float = 5.0,
) -> float:
    """One SGD step on log(lambda) for loss_lambda = -(J_C - d) * exp(log_lambda), clamped to <= log(lambda_max).

    episode_cost: J_C, the mean episode cost over a window of recent episodes (128 in Safe-RLHF).
    Returns the new log_lambda; lambda = exp(log_lambda) (lambda_init = 1 is log_lambda = 0).
    """
    grad = -(episode_cost - threshold) * math.exp(log_lambda)
    return min(log_lambda - lr * grad, math.log(lambda_max))


@register("safe_rlhf", family="safe_rlhf", instances=("group",), arxiv="2310.12773")
def safe_rlhf_loss(
    token_logps: torch.Tensor,
    old_token_logps: torch.Tensor,
    ref_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    rewards: torch.Tensor,
    costs: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    cost_values: torch.Tensor,
    old_cost_values: torch.Tensor,
    lagrange_lambda: float = 1.0,
    beta: float = 0.01,
    epsilon: float = 0.2,
    value_clip: float = 5.0,
    score_clip: float = 50.0,
    gamma: float = 1.0,
    lam: float = 0.95,
    vf_coef: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """Safe-RLHF PPO-Lagrangian actor and critic losses (Dai et al., arXiv 2310.12773; PKU-Alignment/safe-rlhf ppo_lag).

    r_t = -beta (logp_old - logp_ref)_t, r_T += clip(R, +-score_clip);  c_t = +beta (...)_t, c_T += clip(C, +-score_clip)
    (A^R, G^R) = gae(r, V^R_old), (A^C, G^C) = gae(c, V^C_old);  A = (A^R - lambda A^C) / (1 + lambda)
    L = masked_mean( PPO clip(ratio, A, eps) ) + vf_coef * [ L_V(V^R, G^R) + L_V(V^C, G^C) ]  (value clip eps_v)
    lambda is a hyperparameter of one call: update it between steps with `lagrange_update`.

    Inputs: token tensors [N, T]; `rewards`, `costs` [G, K] sequence reward / cost scores (cost > 0 =
    unsafe); `values`, `old_values` and `cost_values`, `old_cost_values` [N, T] for the two critics.
    Defaults: lambda 1.0, kl beta 0.01, eps 0.2, value clip 5, score clip 50, gamma 1, lam 0.95,
    vf_coef 1 (the critics are separate models trained on their own losses). Returns per-sequence [N].
    """
    mask = completion_mask.to(token_logps.dtype)
    with torch.no_grad():
        r = rewards.reshape(-1).clamp(-score_clip, score_clip)
        c = costs.reshape(-1).clamp(-score_clip, score_clip)
        reward_tokens = shaped_rewards(r, old_token_logps, ref_token_logps, mask, beta, "k1")
        cost_tokens = shaped_rewards(c, old_token_logps, ref_token_logps, mask, -beta, "k1")
        reward_adv, reward_returns = gae(reward_tokens, old_values, gamma, lam, mask)
        cost_adv, cost_returns = gae(cost_tokens, old_cost_values, gamma, lam, mask)
        adv = safe_rlhf_advantages(reward_adv, cost_adv, lagrange_lambda)
    ratio = torch.exp(token_logps - old_token_logps)
    actor = clipped_surrogate(ratio, adv, epsilon, epsilon)
    critic = clipped_value_loss(values, old_values, reward_returns, value_clip) + clipped_value_loss(
        cost_values, old_cost_values, cost_returns, value_clip
    )
    losses = _token_level(actor + vf_coef * critic, mask)
    n = mask.sum().clamp(min=1)
    metrics = {
        "actor_loss": ((actor * mask).sum() / n).detach(),
        "critic_loss": ((critic * mask).sum() / n).detach(),
        "reward": rewards.detach().mean(),
        "cost": costs.detach().mean(),
    }
    return losses, metrics


@register("safe_rlhf_cost", family="reward_model", instances=("pair",), arxiv="2310.12773")
def safe_rlhf_cost_loss(
    chosen_costs: torch.Tensor,
    rejected_costs: torch.Tensor,
    chosen_unsafe: torch.Tensor,
    rejected_unsafe: torch.Tensor,
) -> tuple[torch.Tensor, Metrics]:
    """Safe-RLHF cost model (Dai et al., arXiv 2310.12773; the loss form is [R] on the shared sheet).

    chosen = the less harmful response y-, rejected = the more harmful y+;  s(y) = +1 unsafe, -1 safe
    L = -logsig( C(y+) - C(y-) ) - logsig( s(y+) C(y+) ) - logsig( s(y-) C(y-) )
    so C > 0 means unsafe (threshold d = 0).

    Inputs [B]: cost-head outputs for both responses and bool safety labels (True = unsafe).
    Returns per-pair losses [B].
    """
    s_w = chosen_unsafe.to(chosen_costs.dtype) * 2 - 1
    s_l = rejected_unsafe.to(rejected_costs.dtype) * 2 - 1
    losses = (
        -F.logsigmoid(rejected_costs - chosen_costs)
        - F.logsigmoid(s_l * rejected_costs)
        - F.logsigmoid(s_w * chosen_costs)
    )
    gap = (chosen_costs - rejected_costs).detach()
    return losses, {"margin": gap.mean(), "accuracy": (gap < 0).to(gap.dtype).mean()}


@register("modpo", family="modpo", instances=("pair",), arxiv="2310.03708")
def modpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_margin_rewards: torch.Tensor,
    rejected_margin_rewards: torch.Tensor,
    beta: float = 0.1,
    objective_weights: Sequence[float] = (0.5, 0.5),
) -> tuple[torch.Tensor, Metrics]:
    """MODPO, multi-objective DPO (Zhou et al., arXiv 2310.03708; ZHZisZZ/modpo `modpo_loss`).

    L = -logsig( (1/w_0) * [ beta h - w_{-0} . (r_{-0}(y_w) - r_{-0}(y_l)) ] )
    w = objective_weights on the simplex; w_0 belongs to the objective whose pairs are trained,
    w_{-0} to the M-1 others, whose margin rewards come from separate reward models or implicit DPO rewards.

    Inputs: [B] token sums; `chosen_margin_rewards`, `rejected_margin_rewards` [B, M-1] (or [B] for M = 2).
    Defaults: beta 0.1, objective_weights (0.5, 0.5). Returns per-pair losses [B].
    """
    w = torch.as_tensor(list(objective_weights), dtype=chosen_logps.dtype, device=chosen_logps.device)
    gap = (chosen_margin_rewards - rejected_margin_rewards).to(w.dtype).reshape(chosen_logps.shape[0], -1)
    if gap.shape[1] != w.numel() - 1:
        raise ValueError(f"modpo: {w.numel()} objective weights need {w.numel() - 1} margin rewards, got {gap.shape[1]}")
    lr_w = chosen_logps - ref_chosen_logps
    lr_l = rejected_logps - ref_rejected_logps
    margin = (gap * w[1:]).sum(dim=1)
    losses = -F.logsigmoid((beta * (lr_w - lr_l) - margin) / w[0])
    metrics = _pair_metrics(beta, lr_w, lr_l)
    metrics["margin_reward_gap"] = margin.detach().mean()
    return losses, metrics
