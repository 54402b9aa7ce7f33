"""Pair-wise objectives (preference pairs: chosen y_w, rejected y_l). Formulas: shared methods.md section 1.

This module holds DPO and the variants that only change the link applied to the sequence log-ratios
`lr_w = logp_w - ref_w`, `lr_l = logp_l - ref_l` (token sums): methods.md 1.1-1.5 and Appendix A.
Reference-free pair losses live in `pairwise_reffree.py`, losses with extra per-pair signals in
`pairwise_extended.py`, per-token ones in `pairwise_tokens.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from alignpipe.optimization.objectives import Metrics, register

_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")


def _pair_metrics(beta: float, lr_w: torch.Tensor, lr_l: torch.Tensor) -> Metrics:
    """Implicit rewards r = beta * log-ratio and their margin (methods.md 5.3), detached."""
    r_w, r_l = (beta * lr_w).detach(), (beta * lr_l).detach()
    return {
        "reward_chosen": r_w.mean(),
        "reward_rejected": r_l.mean(),
        "margin": (r_w - r_l).mean(),
        "accuracy": (r_w > r_l).float().mean(),
    }


def _smoothed_sigmoid_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """(1 - eps) * -logsig(z) + eps * -logsig(-z): the cDPO form; eps = 0 is plain DPO."""
    losses = -F.logsigmoid(z)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-z)
    return losses


@register("dpo", family="dpo", instances=("pair",), arxiv="2305.18290")
def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """DPO, sigmoid form (Rafailov et al., arXiv 2305.18290).

    L = -log sigmoid(beta * h),  h = (logp_w - ref_w) - (logp_l - ref_l)

    All inputs are [B] token sums over completion tokens (no length normalisation).
    Default beta = 0.1 (paper App. B, TRL). Returns per-pair losses [B].
    """
    lr_w = chosen_logps - ref_chosen_logps
    lr_l = rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (lr_w - lr_l))
    return losses, _pair_metrics(beta, lr_w, lr_l)


@register("cdpo", family="dpo", instances=("pair",), arxiv="Mitchell 2023 note (no arXiv id)")
def cdpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO";
    no arXiv id; the `label_smoothing` form of SimPO / TRL CPO / RLHFlow code).

    L = (1 - eps) * -logsig(beta * h) + eps * -logsig(-beta * h),  eps = assumed label-flip rate

    Inputs [B] token sums as for DPO. Defaults: beta 0.1, label_smoothing (eps) 0.1.
    Returns per-pair losses [B].
    """
    lr_w = chosen_logps - ref_chosen_logps
    lr_l = rejected_logps - ref_rejected_logps
    losses = _smoothed_sigmoid_loss(beta * (lr_w - lr_l), label_smoothing)
    return losses, _pair_metrics(beta, lr_w, lr_l)


@register("robust_dpo", family="dpo", instances=("pair",), arxiv="2403.00409")
def robust_dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """Robust DPO, rDPO (Chowdhury et al., arXiv 2403.00409; TRL `loss_type="robust"`).

    L = [ (1 - eps) * -logsig(beta * h) - eps * -logsig(-beta * h) ] / (1 - 2 eps),  eps in [0, 0.5)

    Unbiased for the clean DPO loss under symmetric flip noise (note the minus, unlike cDPO).
    Inputs [B] token sums. Defaults: beta 0.1, eps 0.1 (paper Sec. 6). Returns per-pair losses [B].
    """
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust_dpo needs label_smoothing in [0, 0.5), got {label_smoothing}")
    lr_w = chosen_logps - ref_chosen_logps
    lr_l = rejected_logps - ref_rejected_logps
    z = beta * (lr_w - lr_l)
    eps = label_smoothing
    losses = ((1 - eps) * -F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return losses, _pair_metrics(beta, lr_w, lr_l)


@register("ipo", family="dpo", instances=("pair",), arxiv="2310.12036")
def ipo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    length_normalize: bool = True,
) -> tuple[torch.Tensor, Metrics]:
    """IPO (Azar et al., arXiv 2310.12036, Eq. 17; TRL `loss_type="ipo"`).

    L = ( h' - 1/(2 beta) )^2, beta = tau
    length_normalize=True (TRL 1.16 form, default): h' = lr_w/|y_w| - lr_l/|y_l|;
    length_normalize=False (paper sum form):        h' = lr_w - lr_l (the target then has to scale with length).

    Inputs [B]: token-sum log-probs and completion lengths (EOS included). Default beta (tau) 0.1,
    i.e. a per-token target margin of 5. Returns per-pair losses [B].
    """
    lr_w = chosen_logps - ref_chosen_logps
    lr_l = rejected_logps - ref_rejected_logps
    if length_normalize:
        lr_w = lr_w / chosen_lengths.clamp(min=1)
        lr_l = lr_l / rejected_lengths.clamp(min=1)
    losses = (lr_w - lr_l - 1 / (2 * beta)) ** 2
    return losses, _pair_metrics(beta, lr_w, lr_l)


@register("slic_hinge", family="dpo", instances=("pair",), arxiv="2305.10425")
def slic_hinge_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """SLiC hinge on the reference-normalised log-ratio (SLiC-HF arXiv 2305.10425; the "hinge-norm" of
    RSO arXiv 2309.06657; TRL `loss_type="hinge"`).

    L = max(0, 1 - beta * h): a margin of 1/beta on h.

    Inputs [B] token sums. Default beta 0.1 (TRL; RSO uses 0.05). For the paper's reference-free
    calibration loss use `slic`. Returns per-pair losses [B].
    """
    lr_w = chosen_logps - ref_chosen_logps
    lr_l = rejected_logps - ref_rejected_logps
    losses = torch.relu(1 - beta * (lr_w - lr_l))
    return losses, _pair_metrics(beta, lr_w, lr_l)


@register("exo_pair", family="dpo", instances=("pair",), arxiv="2402.00856")
def exo_pair_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    epsilon: float = 1e-3,
) -> tuple[torch.Tensor, Metrics]:
    """EXO, pair form (Ji et al., arXiv 2402.00856; TRL `loss_type="exo_pair"`).

    q = sigmoid(beta * h);  L = q * (logsig(beta h) - log(1 - eps)) + (1 - q) * (logsig(-beta h) - log eps)
    i.e. KL(q || [1 - eps, eps]), the reverse KL from the model's pair probability to a smoothed target.

    Inputs [B] token sums. Defaults: beta 0.1, eps 1e-3. Returns per-pair losses [B].
    """
    if not 0 < epsilon < 1:
        raise ValueError(f"exo_pair needs epsilon in (0, 1), got {epsilon}")
    lr_w = chosen_logps - ref_chosen_logps
    lr_l = rejected_logps - ref_rejected_logps
    z = beta * (lr_w - lr_l)
    q = torch.sigmoid(z)
    losses = q * (F.logsigmoid(z) - math.log(1 - epsilon)) + (1 - q) * (F.logsigmoid(-z) - math.log(epsilon))
    return losses, _pair_metrics(beta, lr_w, lr_l)


@register("discopop", family="dpo", instances=("pair",), arxiv="2406.08414")
def discopop_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    tau: float = 0.05,
) -> tuple[torch.Tensor, Metrics]:
    """DiscoPOP, the log-ratio-modulated loss (Chris Lu et al., arXiv 2406.08414; TRL `loss_type="discopop"`).

    z = beta * h,  m = sigmoid(z / tau);  L = (1 - m) * -logsig(z) + m * exp(-z)

    Inputs [B] token sums. Defaults: beta 0.1, tau 0.05. Returns per-pair losses [B].
    """
    lr_w = chosen_logps - ref_chosen_logps
    lr_l = rejected_logps - ref_rejected_logps
    z = beta * (lr_w - lr_l)
    m = torch.sigmoid(z / tau)
    losses = (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z)
    return losses, _pair_metrics(beta, lr_w, lr_l)


@register("nca_pair", family="dpo", instances=("pair",), arxiv="2402.05369")
def nca_pair_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """NCA, pair form (Chen et al., arXiv 2402.05369; TRL `loss_type="nca_pair"`).

    L = -logsig(beta lr_w) - 0.5 * logsig(-beta lr_w) - 0.5 * logsig(-beta lr_l)

    Inputs [B] token sums. Default beta 0.1. Returns per-pair losses [B].
    """
    lr_w = chosen_logps - ref_chosen_logps
    lr_l = rejected_logps - ref_rejected_logps
    r_w, r_l = beta * lr_w, beta * lr_l
    losses = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    return losses, _pair_metrics(beta, lr_w, lr_l)


@register("bco_pair", family="dpo", instances=("pair",), arxiv="2404.04656")
def bco_pair_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """BCO, paired form as in TRL 1.16 (Jung et al., arXiv 2404.04656; TRL `loss_type="bco_pair"`).

    L = -logsig(beta lr_w) - logsig(-beta lr_l)   (TRL omits the reward shift delta; see `bco`)

    Inputs [B] token sums. Default beta 0.1. Returns per-pair losses [B].
    """
    lr_w = chosen_logps - ref_chosen_logps
    lr_l = rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * lr_w) - F.logsigmoid(-beta * lr_l)
    return losses, _pair_metrics(beta, lr_w, lr_l)


@register("apo_zero", family="dpo", instances=("pair",), arxiv="2408.06266")
def apo_zero_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """APO-zero (D'Oosterlinck et al., arXiv 2408.06266; TRL `loss_type="apo_zero"`).

    L = (1 - sigmoid(beta lr_w)) + sigmoid(beta lr_l): raise the winner, lower the loser, each absolutely.

    Inputs [B] token sums. Default beta 0.1. Returns per-pair losses [B].
    """
    lr_w = chosen_logps - ref_chosen_logps
    lr_l = rejected_logps - ref_rejected_logps
    losses = 1 - torch.sigmoid(beta * lr_w) + torch.sigmoid(beta * lr_l)
    return losses, _pair_metrics(beta, lr_w, lr_l)


@register("apo_down", family="dpo", instances=("pair",), arxiv="2408.06266")
def apo_down_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """APO-down (D'Oosterlinck et al., arXiv 2408.06266; TRL `loss_type="apo_down"`).

    L = sigmoid(beta lr_w) + (1 - sigmoid(beta (lr_w - lr_l))): lower both, the loser more.

    Inputs [B] token sums. Default beta 0.1. Returns per-pair losses [B].
    """
    lr_w = chosen_logps - ref_chosen_logps
    lr_l = rejected_logps - ref_rejected_logps
    losses = torch.sigmoid(beta * lr_w) + 1 - torch.sigmoid(beta * (lr_w - lr_l))
    return losses, _pair_metrics(beta, lr_w, lr_l)


@register("sppo_hard", family="dpo", instances=("pair",), arxiv="2405.00675")
def sppo_hard_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """SPPO with hard win-rates (Wu et al., arXiv 2405.00675; TRL `loss_type="sppo_hard"`).

    L = (lr_w - 0.5/beta)^2 + (lr_l + 0.5/beta)^2   (P_hat_w = 1, P_hat_l = 0, eta = 1/beta)

    Inputs [B] token sums; the reference is the previous iterate. Default beta 0.1 (TRL; the SPPO
    paper uses 0.001). Returns per-pair losses [B].
    """
    lr_w = chosen_logps - ref_chosen_logps
    lr_l = rejected_logps - ref_rejected_logps
    losses = (lr_w - 0.5 / beta) ** 2 + (lr_l + 0.5 / beta) ** 2
    return losses, _pair_metrics(beta, lr_w, lr_l)


@register("aot", family="dpo", instances=("pair",), arxiv="2406.05882")
def aot_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    unpaired: bool = False,
) -> tuple[torch.Tensor, Metrics]:
    """Alignment via Optimal Transport (Melnyk et al., arXiv 2406.05882; TRL `aot` / `aot_unpaired`).

    paired:   sort (logp_w - logp_l) and (ref_w - ref_l) over the batch independently,
              delta = sorted_pi - sorted_ref
    unpaired: sort lr_w and lr_l independently, delta = sorted_lr_w - sorted_lr_l
    L = -logsig(beta * delta)

    Inputs [B] token sums. Default beta 0.1. Returns [B] losses in sorted (quantile) order: entry i is
    not pair i, but their mean is the loss.
    """
    lr_w = chosen_logps - ref_chosen_logps
    lr_l = rejected_logps - ref_rejected_logps
    if unpaired:
        delta = torch.sort(lr_w).values - torch.sort(lr_l).values
    else:
        pi_sorted = torch.sort(chosen_logps - rejected_logps).values
        ref_sorted = torch.sort(ref_chosen_logps - ref_rejected_logps).values
        delta = pi_sorted - ref_sorted
    losses = -F.logsigmoid(beta * delta)
    return losses, _pair_metrics(beta, lr_w, lr_l)


def f_divergence_link(logratio: torch.Tensor, divergence: str, alpha: float = 0.5) -> torch.Tensor:
    """f'(pi/pi_ref) as a function of the log-ratio, for f-DPO (methods.md 1.1, TRL `f_divergence_type`).

    reverse_kl: lr;  forward_kl: 1 - exp(-lr);  js: log 2 + logsig(lr);  alpha: (exp((a-1) lr) - 1)/(a-1).
    """
    if divergence == "reverse_kl":
        return logratio
    if divergence == "forward_kl":
        return 1 - torch.exp(-logratio)
    if divergence == "js":
        return math.log(2) + F.logsigmoid(logratio)
    if divergence == "alpha":
        if alpha == 1:
            raise ValueError("alpha divergence needs alpha != 1 (alpha -> 1 is reverse_kl)")
        return (torch.exp((alpha - 1) * logratio) - 1) / (alpha - 1)
    raise ValueError(f"unknown divergence {divergence!r}; use one of {', '.join(_DIVERGENCES)}")


@register("fdpo", family="dpo", instances=("pair",), arxiv="2309.16240")
def fdpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    divergence: str = "reverse_kl",
    alpha: float = 0.5,
) -> tuple[torch.Tensor, Metrics]:
    """f-DPO (Wang et al., "Beyond Reverse KL", arXiv 2309.16240; TRL `f_divergence_type`).

    L = -logsig( beta * (f'(lr_w) - f'(lr_l)) ), with f' from `f_divergence_link`:
    reverse_kl (= DPO), forward_kl, js (Jensen-Shannon), alpha (alpha-divergence, default a = 0.5).

    Inputs [B] token sums. Defaults: beta 0.1, divergence reverse_kl, alpha 0.5. Returns per-pair losses [B].
    """
    lr_w = chosen_logps - ref_chosen_logps
    lr_l = rejected_logps - ref_rejected_logps
    u_w = f_divergence_link(lr_w, divergence, alpha)
    u_l = f_divergence_link(lr_l, divergence, alpha)
    losses = -F.logsigmoid(beta * (u_w - u_l))
    return losses, _pair_metrics(beta, lr_w, lr_l)
