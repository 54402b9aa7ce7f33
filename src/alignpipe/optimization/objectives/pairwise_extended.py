"""Pair-wise objectives that read more than the four sequence log-probs: lengths, score margins,
importance weights, batch statistics or an extra on-policy sample (methods.md 1.9, 1.11, 1.14, 1.15, 1.22).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignpipe.optimization.objectives import Metrics, register
from alignpipe.optimization.objectives.pairwise import _pair_metrics, _smoothed_sigmoid_loss


@register("rdpo", family="dpo", instances=("pair",), arxiv="2403.19159")
def rdpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 0.05,
) -> tuple[torch.Tensor, Metrics]:
    """R-DPO, length-regularised DPO (Park, Rafailov, Ermon, Finn, arXiv 2403.19159).

    L = -logsig( beta * h + alpha * (|y_w| - |y_l|) )
    Sign from the derivation r = beta*lr + alpha*|y| (+ const) and SimPO's Table 3: the length term
    explains away the length part of the preference.

    Inputs [B]: token sums and completion lengths in tokens. Defaults: beta 0.1, alpha 0.05 (alpha is
    tuned per dataset; 0.05 is the smallest value of SimPO's grid [R]). Returns per-pair losses [B].
    """
    lr_w = chosen_logps - ref_chosen_logps
    lr_l = rejected_logps - ref_rejected_logps
    length_gap = (chosen_lengths - rejected_lengths).to(lr_w.dtype)
    losses = -F.logsigmoid(beta * (lr_w - lr_l) + alpha * length_gap)
    return losses, _pair_metrics(beta, lr_w, lr_l)


def wpo_pair_weight(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    chosen_logsumsq: torch.Tensor | float = 0.0,
    rejected_logsumsq: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """WPO pair weight omega = clamp(w(y_w) * w(y_l), max=1), detached.

    w(y) = exp( (logp(y) - S(y)) / |y| ),  S(y) = SUM_t log SUM_v pi(v|ctx_t)^2 (0 for the plain weight).
    """
    with torch.no_grad():
        log_w = (chosen_logps - chosen_logsumsq) / chosen_lengths.clamp(min=1)
        log_l = (rejected_logps - rejected_logsumsq) / rejected_lengths.clamp(min=1)
        return torch.exp(log_w + log_l).clamp(max=1)


def _weighted_dpo(
    omega: torch.Tensor, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor, beta: float, label_smoothing: float,
) -> tuple[torch.Tensor, Metrics]:
    """omega * (label-smoothed) DPO loss: the common body of both WPO forms."""
    lr_w = chosen_logps - ref_chosen_logps
    lr_l = rejected_logps - ref_rejected_logps
    losses = omega * _smoothed_sigmoid_loss(beta * (lr_w - lr_l), label_smoothing)
    metrics = _pair_metrics(beta, lr_w, lr_l)
    metrics["pair_weight"] = omega.mean()
    return losses, metrics


@register("wpo", family="dpo", instances=("pair",), arxiv="2406.11827")
def wpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.01,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """WPO, weighted preference optimisation (Zhou et al., arXiv 2406.11827), plain weights.

    omega = clamp( exp(avgp_w) * exp(avgp_l), max=1 )  detached; avgp = logp/|y| (policy, mean token log-prob)
    L = omega * [ (1 - eps) * -logsig(beta h) + eps * -logsig(-beta h) ]
    The official code's weight also subtracts log SUM_v pi_v^2 per token: use `wpo_aligned` for that.

    Inputs [B]: token sums and lengths. Defaults: beta 0.01, label_smoothing 0. Returns per-pair losses [B].
    """
    omega = wpo_pair_weight(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)
    return _weighted_dpo(omega, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                         label_smoothing)


@register("wpo_aligned", family="dpo", instances=("pair",), arxiv="2406.11827")
def wpo_aligned_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    chosen_logsumsq: torch.Tensor,
    rejected_logsumsq: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.01,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """WPO with sampled-alignment weights, as in the official code (arXiv 2406.11827; wzhouad/WPO run_wpo.py).

    w(y) = exp( (1/|y|) SUM_t [ log pi(y_t|ctx_t) - log SUM_v pi(v|ctx_t)^2 ] ),  omega = clamp(w_w * w_l, max=1)
    L = omega * [ (1 - eps) * -logsig(beta h) + eps * -logsig(-beta h) ]

    Inputs [B]: token sums, lengths, and `chosen_logsumsq` / `rejected_logsumsq`, the token sums of
    logsumexp(2 * log_softmax(logits)) over completion positions (policy). Defaults: beta 0.01,
    label_smoothing 0. Returns per-pair losses [B].
    """
    omega = wpo_pair_weight(
        chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, chosen_logsumsq, rejected_logsumsq
    )
    return _weighted_dpo(omega, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                         label_smoothing)


@register("mmpo", family="dpo", instances=("pair",), arxiv="2410.03145")
def mmpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    margins: torch.Tensor,
    beta: float = 0.01,
    gamma: float = 2.2,
) -> tuple[torch.Tensor, Metrics]:
    """MMPO, margin-matching soft targets (Kim et al., arXiv 2410.03145; kykim0/margin-matching-pref-opt).

    p* = sigmoid(gamma * (s_w - s_l));  L = -[ p* logsig(beta h) + (1 - p*) logsig(-beta h) ]
    p* = 1 recovers DPO.

    Inputs [B]: token sums and `margins` = s_w - s_l (quality-score difference of the pair).
    Defaults: beta 0.01, gamma (--bt_beta) 2.2 (UltraFeedback, Gemma-2B / Llama-3-8B). Returns [B].
    """
    lr_w = chosen_logps - ref_chosen_logps
    lr_l = rejected_logps - ref_rejected_logps
    z = beta * (lr_w - lr_l)
    target = torch.sigmoid(gamma * margins.to(z.dtype))
    losses = -(target * F.logsigmoid(z) + (1 - target) * F.logsigmoid(-z))
    metrics = _pair_metrics(beta, lr_w, lr_l)
    metrics["target_prob"] = target.detach().mean()
    return losses, metrics


def ema_update(mean: float, std: float, values: torch.Tensor, momentum: float = 0.9) -> tuple[float, float]:
    """AlphaDPO running statistics: mu <- m*mu + (1-m)*mean(M), s <- m*s + (1-m)*std(M) (unbiased std)."""
    values = values.detach()
    batch_std = values.std().item() if values.numel() > 1 else 0.0
    return momentum * mean + (1 - momentum) * values.mean().item(), momentum * std + (1 - momentum) * batch_std


@register("alphadpo", family="simpo", instances=("pair",), arxiv="2410.10148")
def alphadpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 2.5,
    gamma_beta_ratio: float = 0.6,
    alpha: float = 0.2,
    running_mean: float | None = None,
    running_std: float | None = None,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, Metrics]:
    """AlphaDPO, adaptive reward margin (Wu et al., arXiv 2410.10148; junkangwu/alpha-DPO, `ln: true`).

    d_pi = avgp_w - avgp_l,  d_ref = ref_avg_w - ref_avg_l,  M = d_pi - d_ref   (per-token means)
    z = sg( (M - mu) / s ),  L = -logsig( beta * (d_pi - alpha*z - gamma/beta) )
    mu, s: running EMA statistics of M (update with `ema_update`, momentum 0.9) passed as `running_mean`
    / `running_std`; when None, the current batch's mean and unbiased std are used (the same as
    initialising the EMA from the first batch). s is clamped to >= eps. alpha = 0 gives SimPO.

    Inputs [B]: token sums and lengths, policy and reference. Defaults (Llama-3-8B-Instruct config):
    beta 2.5, gamma_beta_ratio 0.6, alpha 0.2. Returns per-pair losses [B].
    """
    avg_w = chosen_logps / chosen_lengths.clamp(min=1)
    avg_l = rejected_logps / rejected_lengths.clamp(min=1)
    d_pi = avg_w - avg_l
    with torch.no_grad():
        d_ref = ref_chosen_logps / chosen_lengths.clamp(min=1) - ref_rejected_logps / rejected_lengths.clamp(min=1)
        m = d_pi - d_ref
        mu = m.mean() if running_mean is None else torch.as_tensor(running_mean, dtype=m.dtype, device=m.device)
        if running_std is not None:
            s = torch.as_tensor(running_std, dtype=m.dtype, device=m.device)
        else:
            s = m.std() if m.numel() > 1 else torch.ones((), dtype=m.dtype, device=m.device)
        z = (m - mu) / s.clamp(min=eps)
        margin = alpha * z + gamma_beta_ratio
    losses = -F.logsigmoid(beta * (d_pi - margin))
    metrics = _pair_metrics(beta, avg_w, avg_l)
    metrics["adaptive_margin"] = (beta * margin).mean()
    return losses, metrics


@register("selm", family="dpo", instances=("pair",), arxiv="2405.19332")
def selm_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    sampled_logps: torch.Tensor,
    ref_sampled_logps: torch.Tensor,
    beta: float = 0.01,
    alpha: float = 0.001,
) -> tuple[torch.Tensor, Metrics]:
    """SELM, self-exploring LM: DPO plus an optimism term (Zhang et al., arXiv 2405.19332; `optimistic_dpo_loss`).

    L = -logsig(beta h) + alpha * beta * ( logp(y_ref) - ref(y_ref) )
    y_ref ~ pi_ref(.|x) is a response the reference (previous iterate) generated for the same prompt;
    the term lowers its relative likelihood, pushing the policy toward unexplored responses.

    Inputs [B] token sums; `sampled_logps` / `ref_sampled_logps` are policy / reference token sums of y_ref.
    Defaults: beta 0.01, alpha 0.001 (Zephyr; 1e-4 for Llama-3, Phi-3). Returns per-pair losses [B].
    """
    lr_w = chosen_logps - ref_chosen_logps
    lr_l = rejected_logps - ref_rejected_logps
    lr_s = sampled_logps - ref_sampled_logps
    losses = -F.logsigmoid(beta * (lr_w - lr_l)) + alpha * beta * lr_s
    metrics = _pair_metrics(beta, lr_w, lr_l)
    metrics["reward_sampled"] = (beta * lr_s).detach().mean()
    return losses, metrics
