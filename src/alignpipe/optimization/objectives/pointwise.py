"""Point-wise objectives (one completion and its label or score). Formulas: shared methods.md section 2.

`sft` reads the chosen side of a pair, or an SFT demonstration (whose completion the sft instances hand over
under the same names, `chosen_logps` / `chosen_lengths`); the others read point instances: `logps`, `lengths`, `labels`
(desirable), `scores`, `ref_logps` [B], or reward-model outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from alignpipe.optimization.objectives import Metrics, register


@register("sft", family="sft", instances=("pair", "sft"), arxiv="2404.19733")
def sft_loss(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """Negative log-likelihood of the chosen completion (or the demonstration), length-normalised per sequence.

    L = -logp(y_w) / |y_w|    (the NLL term of RPO, arXiv 2404.19733: DPO + alpha * NLL)

    Inputs [B]: token-sum log-probs and completion lengths (EOS included; a multi-turn demonstration counts
    the tokens of every assistant turn, and only those). On pairs, combine with `dpo` in a
    weighted objective list to get RPO. Returns per-example losses [B].
    """
    nll = -chosen_logps / chosen_lengths.clamp(min=1)
    return nll, {"nll": nll.detach().mean()}


def _split_metrics(rewards: torch.Tensor, desirable: torch.Tensor) -> Metrics:
    """Mean reward of desirable / undesirable examples (0 where a side is absent), detached."""
    r = rewards.detach()
    out = {}
    for name, side in (("reward_desirable", desirable), ("reward_undesirable", ~desirable)):
        out[name] = r[side].mean() if side.any() else torch.zeros((), dtype=r.dtype, device=r.device)
    return out


@register("kto", family="kto", instances=("point",), arxiv="2402.01306")
def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """KTO, Kahneman-Tversky optimisation (Ethayarajh et al., arXiv 2402.01306; TRL `kto_trainer._compute_loss`).

    r = logp(y) - ref(y)  (token sums);  z0 = sg( max(0, mean_j[ kl_logps_j - ref_kl_logps_j ]) )
    desirable:   l = lambda_D * (1 - sigmoid(beta * (r - z0)))
    undesirable: l = lambda_U * (1 - sigmoid(beta * (z0 - r)))

    Inputs [B]: `logps`, `ref_logps` token sums; `labels` bool (True = desirable); `kl_logps`,
    `ref_kl_logps` token sums of mismatched completions (prompt i with the completion of another example,
    TRL shifts by one) for the reference point z0 (gather across ranks before calling when distributed).
    Defaults: beta 0.1, lambda_D = lambda_U = 1 (choose so lambda_D n_D / (lambda_U n_U) is in [1, 4/3]).
    Returns per-example losses [B].
    """
    desirable = labels.bool()
    with torch.no_grad():
        z0 = (kl_logps - ref_kl_logps).mean().clamp(min=0)
    r = logps - ref_logps
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))),
    )
    metrics = _split_metrics(beta * r, desirable)
    metrics["kl_z0"] = z0
    return losses, metrics


def running_mean_update(mean: float, count: int, values: torch.Tensor) -> tuple[float, int]:
    """Merge a batch into a running mean (the mean part of TRL's Welford-style RunningMoments): BCO's delta."""
    n = values.numel()
    if n == 0:
        return mean, count
    total = count + n
    return mean + (values.detach().mean().item() - mean) * n / total, total


@register("bco", family="bco", instances=("point",), arxiv="2404.04656")
def bco_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 0.1,
    delta: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """BCO, binary classifier optimisation (Jung et al., arXiv 2404.04656; TRL v1.0 `bco_loss`).

    r = beta * (logp(y) - ref(y));  desirable: -logsig(r - delta);  undesirable: -logsig(-(r - delta))
    delta: the reward shift, the running mean of r over all samples seen so far (detached); pass it as
    `delta` (keep it with `running_mean_update`, updated before the loss). None uses the current batch
    mean of r, which is the running mean at the first step. The optional UDM density-ratio weights on
    undesirable examples are not included.

    Inputs [B]: token sums and bool `labels` (True = desirable). Default beta 0.1. Returns [B].
    """
    desirable = labels.bool()
    r = beta * (logps - ref_logps)
    shift = r.detach().mean() if delta is None else torch.as_tensor(delta, dtype=r.dtype, device=r.device)
    losses = torch.where(desirable, -F.logsigmoid(r - shift), -F.logsigmoid(-(r - shift)))
    metrics = _split_metrics(r, desirable)
    metrics["delta"] = shift.detach()
    return losses, metrics


@register("bt_reward", family="reward_model", instances=("pair",), arxiv="2203.02155")
def bt_reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margins: torch.Tensor,
    margin_scale: float = 0.0,
    center_coef: float = 0.01,
) -> tuple[torch.Tensor, Metrics]:
    """Bradley-Terry reward-model loss (InstructGPT arXiv 2203.02155; margin: Llama 2 arXiv 2307.09288;
    centering: arXiv 2312.09244; TRL `RewardTrainer.compute_loss`).

    L = -logsig( r(y_w) - r(y_l) - margin_scale * m ) + center_coef * (r(y_w) + r(y_l))^2

    Inputs [B]: `chosen_rewards`, `rejected_rewards` (scalar reward-head outputs at the last non-pad
    token) and the pair `margins` m. Defaults: margin_scale 0 (no margin; 1 uses `margins` as is),
    center_coef 0.01. Returns per-pair losses [B].
    """
    gap = chosen_rewards - rejected_rewards
    losses = -F.logsigmoid(gap - margin_scale * margins.to(gap.dtype))
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    metrics = {
        "reward_chosen": chosen_rewards.detach().mean(),
        "reward_rejected": rejected_rewards.detach().mean(),
        "margin": gap.detach().mean(),
        "accuracy": (gap.detach() > 0).to(gap.dtype).mean(),
    }
    return losses, metrics


@register("regression_reward", family="reward_model", instances=("point",), arxiv="2406.08673")
def regression_reward_loss(predicted_scores: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """Regression (point-wise) reward model (HelpSteer2 arXiv 2406.08673; ArmoRM arXiv 2406.12845).

    L = SUM_k ( r_k(x, y) - s_k )^2: squared error of a K-output head against absolute ratings.

    Inputs: `predicted_scores` [B, K] (or [B] for K = 1) and target `scores` of the same shape.
    No hyperparameters. Returns per-example losses [B].
    """
    err = (predicted_scores - scores.to(predicted_scores.dtype)) ** 2
    losses = err.sum(dim=-1) if err.dim() > 1 else err
    return losses, {"mse": err.detach().mean()}


def astar_values(rewards: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """A*PO stage 1: V*(x) = beta * log( (1/N) SUM_i exp(r_i / beta) ) from N reference samples.

    rewards [P, N] -> [P]. Prompts whose rewards are all 0 are dropped by the caller (filter_all_incorrect).
    """
    return beta * (torch.logsumexp(rewards / beta, dim=-1) - math.log(rewards.shape[-1]))


@register("apo_star", family="apo_star", instances=("point",), arxiv="2505.20686")
def apo_star_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    scores: torch.Tensor,
    optimal_values: torch.Tensor,
    beta: float = 1e-3,
) -> tuple[torch.Tensor, Metrics]:
    """A*PO, optimal-advantage regression, stage 2 (arXiv 2505.20686; TRL experimental a2po).

    L = ( beta * (logp(y) - ref(y)) - (r(x, y) - V*(x)) )^2,  one on-policy sample y per prompt

    Inputs [B]: token sums, the reward `scores`, and `optimal_values` V*(x) from `astar_values`
    (beta1 = 0.5, N = 8 reference samples). Default beta (beta2) 1e-3. Returns per-example losses [B].
    """
    advantage = scores.to(logps.dtype) - optimal_values.to(logps.dtype)
    implicit = beta * (logps - ref_logps)
    losses = (implicit - advantage) ** 2
    return losses, {"advantage": advantage.detach().mean(), "implicit_reward": implicit.detach().mean()}
