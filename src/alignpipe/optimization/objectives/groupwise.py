"""Group-wise objectives (K completions per prompt with scores). Formulas: shared methods.md section 3."""

from __future__ import annotations

import torch

from alignpipe.optimization.objectives import Metrics, register


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: A_i = (r_i - mean(r_group)) / (std(r_group) + eps); std is unbiased (torch default).

    rewards: [G, K]. Returns [G, K]. `scale=False` keeps only the centring (Dr. GRPO).
    Advantages are constants of the loss (detached).
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (rewards.std(dim=1, keepdim=True) + eps)
    return centred.detach()


def kl_estimate(token_logps: torch.Tensor, ref_token_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) estimators k1/k2/k3 (Schulman 2020; methods.md section 7)."""
    log_r = ref_token_logps - token_logps
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.exp(log_r) - log_r - 1
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")


@register("grpo", family="grpo", instances=("group",), arxiv="2402.03300")
def grpo_loss(
    token_logps: torch.Tensor,
    old_token_logps: torch.Tensor,
    ref_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    rewards: torch.Tensor,
    epsilon: float = 0.2,
    beta: float = 0.04,
    kl_estimator: str = "k3",
    aggregation: str = "sequence",
) -> tuple[torch.Tensor, Metrics]:
    """GRPO (Shao et al., DeepSeekMath, arXiv 2402.03300).

    per token:  l_t = -min(rho_t * A, clip(rho_t, 1-eps, 1+eps) * A) + beta * KL_t
                rho_t = exp(logp_t - logp_old_t),  A = group-normalised reward,  KL_t = k3 by default
    aggregation "sequence": mean over each sequence's tokens, then over sequences (the paper);
                "token": sum over all tokens / number of tokens (DAPO-style token-level average).

    Shapes: token tensors [N, T] with N = G*K, group-major; completion_mask [N, T] in {0, 1};
    rewards [G, K]. Defaults: epsilon 0.2, beta 0.04, k3. Returns per-sequence losses [N] whose mean
    is the loss for either aggregation.
    """
    mask = completion_mask.to(token_logps.dtype)
    adv = group_advantages(rewards).reshape(-1, 1)
    ratio = torch.exp(token_logps - old_token_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = kl_estimate(token_logps, ref_token_logps, kl_estimator)
    if beta != 0.0:
        per_token = per_token + beta * kl
    lengths = mask.sum(dim=1).clamp(min=1)
    if aggregation == "sequence":
        losses = (per_token * mask).sum(dim=1) / lengths
    elif aggregation == "token":
        losses = (per_token * mask).sum(dim=1) * mask.shape[0] / mask.sum().clamp(min=1)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; use 'sequence' or 'token'")
    is_clipped = ((ratio - clipped).abs() > 0).to(mask.dtype)
    metrics = {
        "kl": ((kl * mask).sum() / mask.sum().clamp(min=1)).detach(),
        "clip_fraction": ((is_clipped * mask).sum() / mask.sum().clamp(min=1)).detach(),
        "reward": rewards.detach().mean(),
    }
    return losses, metrics
