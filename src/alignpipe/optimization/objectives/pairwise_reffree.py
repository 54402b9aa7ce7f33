"""Reference-free pair-wise objectives: SimPO, ORPO, CPO, SLiC-HF (methods.md 1.5-1.8).

None of these reads a `ref_*` tensor, so no reference model is loaded or precomputed for them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from alignpipe.optimization.objectives import Metrics, register
from alignpipe.optimization.objectives.pairwise import _pair_metrics, _smoothed_sigmoid_loss


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012): expm1 near 0, log1p far from it.

    Each branch sees a safe stand-in where the other is used, so neither leaks inf/NaN into gradients.
    """
    near = x > -math.log(2)
    stand_in = torch.full_like(x, -1.0)
    return torch.where(
        near,
        torch.log(-torch.expm1(torch.where(near, x, stand_in))),
        torch.log1p(-torch.exp(torch.where(near, stand_in, x))),
    )


@register("simpo", family="simpo", instances=("pair",), arxiv="2405.14734")
def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.25,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """SimPO (Meng et al., arXiv 2405.14734; princeton-nlp/SimPO `simpo_loss`).

    L = -logsig( beta * (avgp_w - avgp_l - gamma/beta) ),  avgp = logp / |y|,  gamma = beta * gamma_beta_ratio
    Optional: cDPO label smoothing eps (`label_smoothing`) and `+ sft_weight * (-avgp_w)`.
    No reference model.

    Inputs [B]: token-sum log-probs and completion lengths (EOS included).
    Defaults (repo config): beta 2.0, gamma_beta_ratio 0.25, label_smoothing 0, sft_weight 0.
    Returns per-pair losses [B].
    """
    avg_w = chosen_logps / chosen_lengths.clamp(min=1)
    avg_l = rejected_logps / rejected_lengths.clamp(min=1)
    losses = _smoothed_sigmoid_loss(beta * (avg_w - avg_l - gamma_beta_ratio), label_smoothing)
    if sft_weight:
        losses = losses + sft_weight * -avg_w
    return losses, _pair_metrics(beta, avg_w, avg_l)


@register("orpo", family="orpo", instances=("pair",), arxiv="2403.07691")
def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """ORPO: SFT plus an odds-ratio term (Hong et al., arXiv 2403.07691; TRL `odds_ratio_loss`).

    avgp = logp/|y|,  log_odds(y) = avgp - log(1 - exp(avgp))   (log1mexp, stable)
    L = -avgp_w + beta * -logsig( log_odds(y_w) - log_odds(y_l) )
    The NLL term is included (ORPO is single-stage); beta is the paper's lambda. No reference model.

    Inputs [B]: token-sum log-probs (strictly negative) and completion lengths (EOS included).
    Default beta (lambda) 0.1 (Mistral-ORPO-beta). Returns per-pair losses [B].
    """
    # A per-token mean of exactly 0 (probability 1) would make log(1 - P) = -inf: keep P below 1.
    avg_w = (chosen_logps / chosen_lengths.clamp(min=1)).clamp(max=-1e-12)
    avg_l = (rejected_logps / rejected_lengths.clamp(min=1)).clamp(max=-1e-12)
    log_odds = (avg_w - log1mexp(avg_w)) - (avg_l - log1mexp(avg_l))
    ratio_loss = -F.logsigmoid(log_odds)
    nll = -avg_w
    metrics = _pair_metrics(beta, avg_w, avg_l)
    metrics.update({"nll": nll.detach().mean(), "log_odds_ratio": log_odds.detach().mean()})
    return nll + beta * ratio_loss, metrics


@register("cpo", family="cpo", instances=("pair",), arxiv="2401.08417")
def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """CPO (Xu et al., arXiv 2401.08417; TRL `cpo_loss`, sigmoid type).

    L = -logsig( beta * (logp_w - logp_l) ) + alpha * (-logp_w / |y_w|)
    DPO with a uniform reference (token sums, no normalisation) plus a token-mean NLL on the chosen
    completion (per sequence here; TRL averages over the micro-batch's tokens). No reference model.

    Inputs [B]: token-sum log-probs, chosen lengths. Defaults: beta 0.1, alpha (cpo_alpha) 1.0.
    Returns per-pair losses [B].
    """
    nll = -chosen_logps / chosen_lengths.clamp(min=1)
    losses = -F.logsigmoid(beta * (chosen_logps - rejected_logps)) + alpha * nll
    metrics = _pair_metrics(beta, chosen_logps, rejected_logps)
    metrics["nll"] = nll.detach().mean()
    return losses, metrics


@register("slic", family="slic", instances=("pair",), arxiv="2305.10425")
def slic_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    delta: float = 1.0,
    lam: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """SLiC-HF calibration loss, paper form (Zhao et al., arXiv 2305.10425).

    L = max(0, delta - logp_w + logp_l) - lam * logp_w
    Token sums; the regulariser's target y_ref is the chosen completion. No reference model.
    (For TRL's reference-normalised hinge use `slic_hinge`.)

    Inputs [B] token sums. Defaults: delta 1.0, lam 0.1 (both unverified [R]; SimPO's baseline grid
    was delta in {0.1, 0.5, 1, 2}, lambda in {0.1, 0.5, 1, 10}). Returns per-pair losses [B].
    """
    losses = torch.relu(delta - chosen_logps + rejected_logps) - lam * chosen_logps
    return losses, _pair_metrics(1.0, chosen_logps, rejected_logps)
