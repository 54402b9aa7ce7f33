"""Pair-wise objectives (preference pairs: chosen y_w, rejected y_l). Formulas: shared methods.md section 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignpipe.optimization.objectives import Metrics, register


def _pair_metrics(beta: float, lr_w: torch.Tensor, lr_l: torch.Tensor) -> Metrics:
    """Implicit rewards r = beta * log-ratio and their margin (methods.md 5.3), detached."""
    r_w, r_l = (beta * lr_w).detach(), (beta * lr_l).detach()
    return {
        "reward_chosen": r_w.mean(),
        "reward_rejected": r_l.mean(),
        "margin": (r_w - r_l).mean(),
        "accuracy": (r_w > r_l).float().mean(),
    }


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
