"""Pair-wise objectives over per-token quantities: TIS-DPO, TDPO, LD-DPO (methods.md 1.1, 1.12, 1.13).

Token tensors are [B, T] in the trainer's layout (position t predicts token t+1; prompt and padding
positions have mask 0 and may hold anything). `chosen_mask` / `rejected_mask` are 1 on completion
tokens (EOS included). `*_token_kl` is the per-position KL(pi_ref(.|ctx_t) || pi_theta(.|ctx_t)) over the
full vocabulary, differentiable through pi_theta.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignpipe.optimization.objectives import Metrics, register
from alignpipe.optimization.objectives.pairwise import _pair_metrics


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over completion positions: [B, T] -> [B]; positions off the mask never contribute (even NaN)."""
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum(dim=-1)


def tisdpo_weights(
    scores: torch.Tensor,
    low: float = -1.5,
    high: float = 1.5,
    w_min: float = 0.7,
    w_max: float = 1.3,
) -> torch.Tensor:
    """TIS-DPO `threshold_and_scale` token weights (exlaw/TIS-DPO preference_datasets.py).

    Clamp the contrastive scores d_t (log pi+ - log pi- on winners, log pi- - log pi+ on losers) to
    [low, high], then map linearly onto [w_min, w_max]. Returns weights of the shape of `scores`.
    """
    clipped = scores.clamp(min=low, max=high)
    return w_min + (clipped - low) * (w_max - w_min) / (high - low)


@register("tisdpo", family="dpo", instances=("pair",), arxiv="2410.04350")
def tisdpo_loss(
    chosen_token_logps: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    ref_chosen_token_logps: torch.Tensor,
    ref_rejected_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    chosen_token_weights: torch.Tensor,
    rejected_token_weights: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """TIS-DPO(S), token-level importance sampling (Liu et al., arXiv 2410.04350; exlaw/TIS-DPO `tisdpo_loss`,
    repo default `token_level: false`).

    LR_w = SUM_t w^w_t (log pi(y^w_t) - log ref(y^w_t)),  LR_l likewise;  L = -logsig( beta * (LR_w - LR_l) )

    Inputs [B, T]: per-token log-probs (policy, reference), masks, and token weights estimated offline
    (e.g. `tisdpo_weights` of contrastive-model scores; all ones gives DPO). Default beta 0.1.
    Returns per-pair losses [B].
    """
    lr_w = _masked_sum(chosen_token_weights * (chosen_token_logps - ref_chosen_token_logps), chosen_mask)
    lr_l = _masked_sum(rejected_token_weights * (rejected_token_logps - ref_rejected_token_logps), rejected_mask)
    losses = -F.logsigmoid(beta * (lr_w - lr_l))
    return losses, _pair_metrics(beta, lr_w, lr_l)


@register("tisdpo_kl", family="dpo", instances=("pair",), arxiv="2410.04350")
def tisdpo_kl_loss(
    chosen_token_logps: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    ref_chosen_token_logps: torch.Tensor,
    ref_rejected_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    chosen_token_weights: torch.Tensor,
    rejected_token_weights: torch.Tensor,
    chosen_token_kl: torch.Tensor,
    rejected_token_kl: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 0.5,
) -> tuple[torch.Tensor, Metrics]:
    """TIS-DPO, token-level variant (arXiv 2410.04350; exlaw/TIS-DPO `token_level: true`).

    L = -logsig( beta * [ (LR_w - LR_l) - alpha * (K_w - K_l) ] ),  K = SUM_t w_t * KL(pi_ref || pi_theta)_t
    Note the sign (K_w - K_l), the opposite of TDPO.

    Inputs [B, T]: as `tisdpo`, plus per-position KL tensors. Defaults: beta 0.1, alpha 0.5.
    Returns per-pair losses [B].
    """
    lr_w = _masked_sum(chosen_token_weights * (chosen_token_logps - ref_chosen_token_logps), chosen_mask)
    lr_l = _masked_sum(rejected_token_weights * (rejected_token_logps - ref_rejected_token_logps), rejected_mask)
    kl_w = _masked_sum(chosen_token_weights * chosen_token_kl, chosen_mask)
    kl_l = _masked_sum(rejected_token_weights * rejected_token_kl, rejected_mask)
    losses = -F.logsigmoid(beta * ((lr_w - lr_l) - alpha * (kl_w - kl_l)))
    metrics = _pair_metrics(beta, lr_w, lr_l)
    metrics.update({"kl_chosen": kl_w.detach().mean(), "kl_rejected": kl_l.detach().mean()})
    return losses, metrics


def _tdpo(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_token_kl: torch.Tensor,
    rejected_token_kl: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    beta: float,
    alpha: float,
    detach_chosen_kl: bool,
) -> tuple[torch.Tensor, Metrics]:
    lr_w = chosen_logps - ref_chosen_logps
    lr_l = rejected_logps - ref_rejected_logps
    seq_kl_w = _masked_sum(chosen_token_kl, chosen_mask)
    seq_kl_l = _masked_sum(rejected_token_kl, rejected_mask)
    kl_w = seq_kl_w.detach() if detach_chosen_kl else seq_kl_w
    losses = -F.logsigmoid(beta * ((lr_w - lr_l) - alpha * (seq_kl_l - kl_w)))
    metrics = _pair_metrics(beta, lr_w, lr_l)
    metrics.update({"kl_chosen": seq_kl_w.detach().mean(), "kl_rejected": seq_kl_l.detach().mean()})
    return losses, metrics


@register("tdpo1", family="dpo", instances=("pair",), arxiv="2404.11999")
def tdpo1_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_token_kl: torch.Tensor,
    rejected_token_kl: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """TDPO1, token-level DPO (Zeng et al., arXiv 2404.11999; Vance0124/Token-level-DPO `tdpo_loss`).

    SeqKL(y) = SUM_t KL(pi_ref(.|ctx_t) || pi_theta(.|ctx_t));  L = -logsig( beta * [ h - (SeqKL_l - SeqKL_w) ] )

    Inputs: [B] token-sum log-probs (policy, reference); [B, T] per-position KL and masks.
    Default beta 0.1. Returns per-pair losses [B].
    """
    return _tdpo(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_token_kl, rejected_token_kl, chosen_mask, rejected_mask, beta, 1.0, False,
    )


@register("tdpo2", family="dpo", instances=("pair",), arxiv="2404.11999")
def tdpo2_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_token_kl: torch.Tensor,
    rejected_token_kl: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 0.5,
) -> tuple[torch.Tensor, Metrics]:
    """TDPO2 (Zeng et al., arXiv 2404.11999; Vance0124/Token-level-DPO `tdpo_loss`, `if_tdpo2: true`).

    L = -logsig( beta * [ h - alpha * (SeqKL_l - sg(SeqKL_w)) ] )

    Inputs as `tdpo1`. Defaults: beta 0.1, alpha 0.5. Returns per-pair losses [B].
    """
    return _tdpo(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_token_kl, rejected_token_kl, chosen_mask, rejected_mask, beta, alpha, True,
    )


def ld_token_weights(chosen_mask: torch.Tensor, rejected_mask: torch.Tensor, alpha: float) -> tuple[
    torch.Tensor, torch.Tensor
]:
    """LD-DPO token weights [B, T]: 1 on the first min(|y_w|, |y_l|) completion tokens, alpha after, 0 off the mask."""
    mask_w, mask_l = chosen_mask.bool(), rejected_mask.bool()
    index_w = mask_w.long().cumsum(dim=-1)  # 1-based position within the completion
    index_l = mask_l.long().cumsum(dim=-1)
    public = torch.minimum(mask_w.sum(-1), mask_l.sum(-1)).unsqueeze(-1)

    def weights(index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = torch.where(index <= public, 1.0, alpha)
        return torch.where(mask, w, 0.0)

    return weights(index_w, mask_w), weights(index_l, mask_l)


@register("lddpo", family="dpo", instances=("pair",), arxiv="2409.06411")
def lddpo_loss(
    chosen_token_logps: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    ref_chosen_token_logps: torch.Tensor,
    ref_rejected_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 0.5,
) -> tuple[torch.Tensor, Metrics]:
    """LD-DPO, length-desensitised DPO (arXiv 2409.06411; TRL `ld_alpha`).

    logp'(y) = logp(first min(|y_w|, |y_l|) tokens) + alpha * logp(remaining tokens), for policy and
    reference alike;  L = -logsig( beta * [ (logp'_w - ref'_w) - (logp'_l - ref'_l) ] )

    Inputs [B, T]: per-token log-probs (policy, reference) and completion masks. Defaults: beta 0.1,
    alpha (ld_alpha) 0.5 (paper's suggestion; alpha = 1 is DPO). Returns per-pair losses [B].
    """
    weights_w, weights_l = ld_token_weights(chosen_mask, rejected_mask, alpha)
    weights_w, weights_l = weights_w.to(chosen_token_logps.dtype), weights_l.to(rejected_token_logps.dtype)
    lr_w = _masked_sum(weights_w * (chosen_token_logps - ref_chosen_token_logps), chosen_mask)
    lr_l = _masked_sum(weights_l * (rejected_token_logps - ref_rejected_token_logps), rejected_mask)
    losses = -F.logsigmoid(beta * (lr_w - lr_l))
    return losses, _pair_metrics(beta, lr_w, lr_l)
