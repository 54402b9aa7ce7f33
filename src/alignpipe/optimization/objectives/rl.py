"""On-policy RL objectives over groups of sampled completions: PPO (+GAE), RLOO, ReMax, GSPO, DAPO,
Dr. GRPO (methods.md 2.3-2.5, 3.2, 3.3), and their pure helpers.

Token tensors are [N, T] with N = G*K rows, group-major (`token_logps`, `old_token_logps`,
`ref_token_logps`, `completion_mask`, and for PPO `values`, `old_values`); `rewards` is [G, K].
Advantages, shaped rewards and returns are constants of the loss (computed under no_grad).
"""

from __future__ import annotations

import torch

from alignpipe.optimization.objectives import Metrics, register
from alignpipe.optimization.objectives.groupwise import group_advantages, kl_estimate


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """PPO clipped policy loss per element: -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)."""
    return -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)


def _token_level(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence losses [N] whose mean is SUM over all valid tokens / number of valid tokens."""
    return (per_token * mask).sum(dim=1) * mask.shape[0] / mask.sum().clamp(min=1)


def _clip_fraction(ratio: torch.Tensor, mask: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    outside = ((ratio < 1 - eps_low) | (ratio > 1 + eps_high)).to(mask.dtype)
    return ((outside * mask).sum() / mask.sum().clamp(min=1)).detach()


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., arXiv 1506.02438), backwards over T.

    delta_t = r_t + gamma V_{t+1} - V_t (V past the end = 0);  A_t = delta_t + gamma lam A_{t+1};  G_t = A_t + V_t
    rewards, values: [N, T]. With `mask`, rewards and values off the mask are zeroed first, so the value
    after the last completion token counts as 0. Returns (advantages, returns), both [N, T].
    """
    if mask is not None:
        rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, advantages + values


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries; var Bessel-corrected (TRL `masked_whiten`)."""
    n = mask.sum()
    mean = (values * mask).sum() / n.clamp(min=1)
    var = (((values - mean) ** 2) * mask).sum() / (n - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a [N, T] mask (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).amax(dim=1)


def shaped_rewards(
    scores: torch.Tensor,
    old_token_logps: torch.Tensor,
    ref_token_logps: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.05,
    kl_estimator: str = "k1",
) -> torch.Tensor:
    """Classic RLHF per-token reward: r_t = -beta * KL_t on completion tokens, plus the sequence score on
    the last completion token (EOS). scores [N]; token tensors [N, T]. Returns [N, T] (0 off the mask)."""
    kl = kl_estimate(old_token_logps, ref_token_logps, kl_estimator)
    rewards = torch.where(mask.bool(), -beta * kl, torch.zeros_like(kl))
    has_tokens = mask.bool().any(dim=1)
    bonus = torch.where(has_tokens, scores.to(rewards.dtype), torch.zeros_like(scores, dtype=rewards.dtype))
    return rewards.scatter_add(1, last_token_index(mask).unsqueeze(1), bonus.unsqueeze(1))


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
) -> torch.Tensor:
    """0.5 * max( (V - G)^2, (clip(V, V_old - c, V_old + c) - G)^2 ), per element."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


@register("ppo", family="ppo", instances=("group",), arxiv="1707.06347")
def ppo_loss(
    token_logps: torch.Tensor,
    old_token_logps: torch.Tensor,
    ref_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    beta: float = 0.05,
    kl_estimator: str = "k1",
    epsilon: float = 0.2,
    value_clip: float = 0.2,
    vf_coef: float = 0.1,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_advantages: bool = True,
) -> tuple[torch.Tensor, Metrics]:
    """PPO with a KL-shaped reward and GAE (Schulman et al. arXiv 1707.06347; RLHF: Ziegler et al.
    arXiv 1909.08593, InstructGPT arXiv 2203.02155; TRL v1.0 experimental PPO).

    r_t = -beta * KL_t(old, ref) (+ score on the last token);  (A, G) = gae(r, V_old, gamma, lam);
    A whitened over the batch's valid tokens;  ratio_t = exp(logp_t - logp_old_t)
    L_pi = masked_mean( max(-A ratio, -A clip(ratio, 1 +- eps)) )
    L_V  = masked_mean( 0.5 * max( (V - G)^2, (clip(V, V_old +- eps_v) - G)^2 ) );  L = L_pi + vf_coef * L_V
    The advantages are recomputed from the rollout quantities on each call (whitening over the
    micro-batch given).

    Inputs: token tensors [N, T]; `rewards` [G, K] sequence scores (any K; K = 1 is classic PPO);
    `values` [N, T] the critic's current predictions (with grad), `old_values` [N, T] at rollout.
    Defaults (TRL): beta 0.05, k1, eps 0.2, eps_v 0.2, vf_coef 0.1, gamma 1, lam 0.95, whitening on.
    Returns per-sequence losses [N] whose mean is L.
    """
    mask = completion_mask.to(token_logps.dtype)
    with torch.no_grad():
        token_rewards = shaped_rewards(rewards.reshape(-1), old_token_logps, ref_token_logps, mask, beta, kl_estimator)
        adv, returns = gae(token_rewards, old_values, gamma, lam, mask)
        if whiten_advantages:
            adv = masked_whiten(adv, mask)
    ratio = torch.exp(token_logps - old_token_logps)
    policy = clipped_surrogate(ratio, adv, epsilon, epsilon)
    value = clipped_value_loss(values, old_values, returns, value_clip)
    losses = _token_level(policy + vf_coef * value, mask)
    n = mask.sum().clamp(min=1)
    metrics = {
        "policy_loss": ((policy * mask).sum() / n).detach(),
        "value_loss": ((value * mask).sum() / n).detach(),
        "clip_fraction": _clip_fraction(ratio, mask, epsilon, epsilon),
        "kl": ((kl_estimate(old_token_logps, ref_token_logps, kl_estimator) * mask).sum() / n).detach(),
        "reward": rewards.detach().mean(),
    }
    return losses, metrics


@register("rloo", family="rloo", instances=("group",), arxiv="2402.14740")
def rloo_loss(
    token_logps: torch.Tensor,
    old_token_logps: torch.Tensor,
    ref_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    rewards: torch.Tensor,
    beta: float = 0.05,
    epsilon: float = 0.2,
    normalize_advantages: bool = False,
) -> tuple[torch.Tensor, Metrics]:
    """RLOO, REINFORCE leave-one-out (Ahmadian et al., arXiv 2402.14740; TRL `rloo_trainer`).

    R_i = r_i - beta * SUM_t (logp_old - logp_ref)_t;  A_i = R_i - (1/(K-1)) SUM_{j != i} R_j
    ratio_i = exp( SUM_t logp_t - SUM_t logp_old_t );  L_i = max( -A_i ratio_i, -A_i clip(ratio_i, 1 +- eps) )
    With one update per rollout (ratio = 1) the gradient is the paper's REINFORCE -A_i grad logp(y_i).
    normalize_advantages: (A - mean) / (std + 1e-4) over the whole batch (REINFORCE++ style).

    Inputs: token tensors [N, T], `rewards` [G, K] with K >= 2. Defaults (TRL): beta 0.05, eps 0.2.
    Returns per-sequence losses [N].
    """
    g, k = rewards.shape
    if k < 2:
        raise ValueError("rloo needs at least 2 completions per prompt")
    mask = completion_mask.to(token_logps.dtype)
    with torch.no_grad():
        kl = ((old_token_logps - ref_token_logps) * mask).sum(dim=1).reshape(g, k)
        total = rewards.to(kl.dtype) - beta * kl
        adv = total - (total.sum(dim=1, keepdim=True) - total) / (k - 1)
        adv = adv.reshape(-1)
        if normalize_advantages:
            adv = (adv - adv.mean()) / (adv.std() + 1e-4)
    ratio = torch.exp(((token_logps - old_token_logps) * mask).sum(dim=1))
    losses = clipped_surrogate(ratio, adv, epsilon, epsilon)
    metrics = {
        "kl": kl.mean(),
        "clip_fraction": ((ratio < 1 - epsilon) | (ratio > 1 + epsilon)).to(mask.dtype).mean().detach(),
        "reward": rewards.detach().mean(),
    }
    return losses, metrics


@register("remax", family="remax", instances=("group",), arxiv="2310.10505")
def remax_loss(
    token_logps: torch.Tensor,
    ref_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    rewards: torch.Tensor,
    baseline_rewards: torch.Tensor,
    beta: float = 0.05,
    gamma: float = 0.99,
    reward_clip: float = 5.0,
) -> tuple[torch.Tensor, Metrics]:
    """ReMax, REINFORCE with a greedy baseline (Li et al., arXiv 2310.10505; liziniu/ReMax `remax_trainer.py`).

    A = clip(r(x, y) - r(x, y_greedy), -c, c);  G_t = -beta (logp_t - ref_t) + gamma^(T - t + 1) * A
    (t = 1..T over completion tokens; the KL term is per token, not accumulated; G is detached)
    L = -SUM_t G_t logp_t / SUM_t mask_t   over all valid tokens of the batch

    Inputs: token tensors [N, T]; `rewards` [G, K] of the sampled completions; `baseline_rewards` [G]
    the reward of each prompt's greedy decode. Defaults: beta (kl_ctl) 0.05, gamma 0.99, clip 5.
    Returns per-sequence losses [N].
    """
    g, k = rewards.shape
    mask = completion_mask.to(token_logps.dtype)
    with torch.no_grad():
        adv = (rewards - baseline_rewards.reshape(g, 1)).clamp(-reward_clip, reward_clip).reshape(-1, 1)
        position = mask.cumsum(dim=1)  # t, 1-based on completion tokens
        length = mask.sum(dim=1, keepdim=True)
        discount = torch.where(mask.bool(), gamma ** (length - position + 1), torch.zeros_like(mask))
        returns = -beta * (token_logps - ref_token_logps) + discount * adv.to(mask.dtype)
    losses = _token_level(-returns * token_logps, mask)
    return losses, {"advantage": adv.mean(), "reward": rewards.detach().mean()}


@register("gspo", family="grpo", instances=("group",), arxiv="2507.18071")
def gspo_loss(
    token_logps: torch.Tensor,
    old_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    rewards: torch.Tensor,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> tuple[torch.Tensor, Metrics]:
    """GSPO, group sequence policy optimisation (Zheng et al., Qwen, arXiv 2507.18071).

    s_i = exp( (1/|y_i|) SUM_t (logp_t - logp_old_t) )  (length-normalised sequence ratio)
    L_i = -min( s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i ),  A = group-normalised rewards (GRPO)
    No KL term. The formula is not on the shared sheet: from the paper [R].

    Inputs: token tensors [N, T], `rewards` [G, K]. Defaults (paper): eps_low 3e-4, eps_high 4e-4.
    Returns per-sequence losses [N].
    """
    mask = completion_mask.to(token_logps.dtype)
    adv = group_advantages(rewards).reshape(-1)
    lengths = mask.sum(dim=1).clamp(min=1)
    ratio = torch.exp(((token_logps - old_token_logps) * mask).sum(dim=1) / lengths)
    losses = clipped_surrogate(ratio, adv, eps_low, eps_high)
    clipped = ((ratio < 1 - eps_low) | (ratio > 1 + eps_high)).to(mask.dtype).mean().detach()
    return losses, {"clip_fraction": clipped, "reward": rewards.detach().mean()}


def overlong_penalty(lengths: torch.Tensor, max_length: int = 20480, cache_length: int = 4096) -> torch.Tensor:
    """DAPO soft overlong punishment R_len (arXiv 2503.14476, Eq. 13), added to the reward.

    0 if |y| <= L_max - L_cache;  ((L_max - L_cache) - |y|) / L_cache if |y| <= L_max;  -1 beyond L_max.
    """
    lengths = lengths.to(torch.get_default_dtype()) if not lengths.is_floating_point() else lengths
    start = max_length - cache_length
    ramp = (start - lengths) / cache_length
    return torch.where(lengths <= start, torch.zeros_like(lengths), torch.where(lengths <= max_length, ramp, -torch.ones_like(lengths)))


def dynamic_sampling_mask(rewards: torch.Tensor) -> torch.Tensor:
    """DAPO dynamic sampling: [G, K] -> [G] bool, True for groups whose rewards are not all equal
    (0 < #correct < K for a binary verifier); the others have zero advantage and are resampled or dropped."""
    return (rewards != rewards[:, :1]).any(dim=1)


@register("dapo", family="grpo", instances=("group",), arxiv="2503.14476")
def dapo_loss(
    token_logps: torch.Tensor,
    old_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    rewards: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
) -> tuple[torch.Tensor, Metrics]:
    """DAPO (Yu et al., ByteDance Seed, arXiv 2503.14476; TRL `loss_type="dapo"`).

    L = (1 / SUM_i |o_i|) SUM_i SUM_t -min( ratio_it A_i, clip(ratio_it, 1 - eps_low, 1 + eps_high) A_i )
    Clip-higher (eps_high > eps_low), token-level averaging over the batch, A group-normalised, no KL.
    Dynamic sampling (`dynamic_sampling_mask`), overlong filtering (drop truncated rows from the mask)
    and soft overlong punishment (`overlong_penalty`, added to the rewards) are data-side helpers.

    Inputs: token tensors [N, T], `rewards` [G, K]. Defaults: eps_low 0.2, eps_high 0.28.
    Returns per-sequence losses [N] whose mean is the token-level loss.
    """
    mask = completion_mask.to(token_logps.dtype)
    adv = group_advantages(rewards).reshape(-1, 1)
    ratio = torch.exp(token_logps - old_token_logps)
    losses = _token_level(clipped_surrogate(ratio, adv, eps_low, eps_high), mask)
    return losses, {"clip_fraction": _clip_fraction(ratio, mask, eps_low, eps_high), "reward": rewards.detach().mean()}


@register("dr_grpo", family="grpo", instances=("group",), arxiv="2503.20783")
def dr_grpo_loss(
    token_logps: torch.Tensor,
    old_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    rewards: torch.Tensor,
    epsilon: float = 0.2,
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Dr. GRPO, GRPO done right (Liu et al., arXiv 2503.20783; TRL `loss_type="dr_grpo"`, scale_rewards none).

    A_i = R_i - mean(R) (no std);  L = (1 / (N * L_max)) SUM_i SUM_t -min( ratio A_i, clip(ratio, 1 +- eps) A_i )
    A constant normaliser instead of 1/|o_i|: no length or difficulty bias; no KL term.
    max_completion_length = L_max; set it to the sampler's max new tokens. None uses the longest
    completion of the batch (then the normaliser varies with the batch).

    Inputs: token tensors [N, T], `rewards` [G, K]. Default eps 0.2. Returns per-sequence losses [N].
    """
    mask = completion_mask.to(token_logps.dtype)
    adv = group_advantages(rewards, scale=False).reshape(-1, 1)
    ratio = torch.exp(token_logps - old_token_logps)
    per_token = clipped_surrogate(ratio, adv, epsilon, epsilon)
    l_max = max_completion_length if max_completion_length is not None else mask.sum(dim=1).max().clamp(min=1)
    losses = (per_token * mask).sum(dim=1) / l_max
    return losses, {"clip_fraction": _clip_fraction(ratio, mask, epsilon, epsilon), "reward": rewards.detach().mean()}
