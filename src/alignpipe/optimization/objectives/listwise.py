"""List-wise objectives over K scored completions per prompt: RRHF, PRO, LiPO-lambda, PPA/NeuralNDCG
(methods.md 3.4-3.7).

Inputs (group instances): `logps` [G*K] completion token sums, group-major; `lengths` [G*K] completion
tokens (EOS included); `ref_logps` [G*K] the same under the reference; `rewards` [G, K] scores or grades.
Each returns per-group losses [G].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignpipe.optimization.objectives import Metrics, register


def _grouped(values: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    return values.reshape(rewards.shape)


@register("rrhf", family="rrhf", instances=("group",), arxiv="2304.05302")
def rrhf_loss(
    logps: torch.Tensor,
    lengths: torch.Tensor,
    rewards: torch.Tensor,
    rank_weight: float = 1.0,
    length_penalty: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """RRHF, rank responses with human feedback (Yuan et al., arXiv 2304.05302; GanjinZero/RRHF train.py).

    p_i = logp(y_i) / |y_i|^length_penalty
    L_rank = SUM_{(i, j): r_i < r_j} max(0, p_i - p_j);  L_ft = -logp(y_best) / |y_best|,  best = argmax_i r_i
    L = rank_weight * L_rank + L_ft
    L_ft is the token-mean NLL of the best candidate (the code's mean over its positions). No reference.

    Inputs: `logps`, `lengths` [G*K], `rewards` [G, K]. Defaults: rank_weight (rrhf_weight) 1 (the
    released scripts; the code default is 100), length_penalty 1. Returns per-group losses [G].
    """
    lens = _grouped(lengths, rewards).to(logps.dtype).clamp(min=1)
    seq = _grouped(logps, rewards)
    p = seq / lens**length_penalty
    worse = rewards.unsqueeze(2) < rewards.unsqueeze(1)  # [G, i, j]: r_i < r_j
    gaps = torch.relu(p.unsqueeze(2) - p.unsqueeze(1))
    rank = (gaps * worse.to(gaps.dtype)).sum(dim=(1, 2))
    best = rewards.argmax(dim=1, keepdim=True)
    nll = -(seq / lens).gather(1, best).squeeze(1)
    return rank_weight * rank + nll, {"rank_loss": rank.detach().mean(), "nll": nll.detach().mean()}


@register("pro", family="pro", instances=("group",), arxiv="2306.17492")
def pro_loss(
    logps: torch.Tensor,
    lengths: torch.Tensor,
    rewards: torch.Tensor,
    sft_weight: float = 0.05,
    reward_temperatures: bool = True,
) -> tuple[torch.Tensor, Metrics]:
    """PRO, preference ranking optimisation (Song et al., arXiv 2306.17492; DAMO-ConvAI/PRO `compute_loss`).

    Sort by reward, y^1 > ... > y^n; s_k = logp(y^k)/|y^k|.  For k < i: T^i_k = r^k - r^i, T^k_k = max_{i>k} T^i_k
    L_PRO = SUM_{k=1}^{n-1} [ log( exp(s_k T^k_k) + SUM_{i>k} exp(s_i T^i_k) ) - s_k T^k_k ]
    L = L_PRO + sft_weight * (n-1)^2 * ( -logp(y^1) )   (token-sum NLL of the top candidate)
    reward_temperatures=False sets every T to 1 (a plain list-wise softmax). No reference.

    Inputs: `logps`, `lengths` [G*K], `rewards` [G, K] (K >= 2). Defaults: sft_weight 0.05, temperatures on.
    Returns per-group losses [G].
    """
    n = rewards.shape[1]
    seq = _grouped(logps, rewards)
    scores = seq / _grouped(lengths, rewards).to(logps.dtype).clamp(min=1)
    order = torch.argsort(rewards, dim=1, descending=True, stable=True)
    s, r = scores.gather(1, order), rewards.gather(1, order).to(scores.dtype)
    ranking = torch.zeros_like(s[:, 0])
    for k in range(n - 1):
        if reward_temperatures:
            t_rest = r[:, k : k + 1] - r[:, k + 1 :]
            t_top = t_rest.max(dim=1, keepdim=True).values
        else:
            t_rest = torch.ones_like(s[:, k + 1 :])
            t_top = torch.ones_like(s[:, k : k + 1])
        logits = torch.cat([s[:, k : k + 1] * t_top, s[:, k + 1 :] * t_rest], dim=1)
        ranking = ranking + torch.logsumexp(logits, dim=1) - logits[:, 0]
    nll = -seq.gather(1, order[:, :1]).squeeze(1)
    losses = ranking + sft_weight * (n - 1) ** 2 * nll
    return losses, {"rank_loss": ranking.detach().mean(), "nll": nll.detach().mean()}


def model_ranks(scores: torch.Tensor) -> torch.Tensor:
    """1-based rank of each item when its row is sorted by score, descending: [G, K] -> [G, K] (long)."""
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    positions = torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


@register("lipo_lambda", family="lipo", instances=("group",), arxiv="2402.01878")
def lipo_lambda_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    beta: float = 0.05,
) -> tuple[torch.Tensor, Metrics]:
    """LiPO-lambda, list-wise preference optimisation with LambdaLoss weights (Liu et al., arXiv 2402.01878).

    s_i = beta * (logp(y_i) - ref(y_i));  L = -SUM_{(i, j): psi_i > psi_j} Delta_ij * logsig(s_i - s_j)
    Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|, G = 2^psi - 1, D(tau) = log(1 + tau) (natural log),
    tau = 1-based rank under the model scores s (descending); Delta is detached.

    Inputs: `logps`, `ref_logps` [G*K] token sums; `rewards` [G, K] labels psi. Default beta 0.05 [R].
    Returns per-group losses [G].
    """
    s = beta * _grouped(logps - ref_logps, rewards)
    with torch.no_grad():
        gains = 2.0 ** rewards.to(s.dtype) - 1
        inv_disc = 1 / torch.log1p(model_ranks(s).to(s.dtype))
        delta = (gains.unsqueeze(2) - gains.unsqueeze(1)).abs() * (inv_disc.unsqueeze(2) - inv_disc.unsqueeze(1)).abs()
        better = (rewards.unsqueeze(2) > rewards.unsqueeze(1)).to(s.dtype)
    pair = F.logsigmoid(s.unsqueeze(2) - s.unsqueeze(1))
    losses = -(delta * better * pair).sum(dim=(1, 2))
    return losses, {"score_spread": (s.max(1).values - s.min(1).values).detach().mean()}


def sinkhorn(matrix: torch.Tensor, max_iter: int = 50, tol: float = 1e-6, eps: float = 1e-10) -> torch.Tensor:
    """Sinkhorn scaling of [G, K, K] positive matrices toward doubly stochastic.

    Each iteration divides by column sums, then by row sums; a matrix stops changing once all its row
    and column sums are within `tol` of 1 (per matrix, so one group's convergence does not depend on
    the others).
    """
    done = torch.zeros(matrix.shape[0], dtype=torch.bool, device=matrix.device)
    for _ in range(max_iter):
        scaled = matrix / matrix.sum(dim=1, keepdim=True).clamp(min=eps)
        scaled = scaled / scaled.sum(dim=2, keepdim=True).clamp(min=eps)
        matrix = torch.where(done[:, None, None], matrix, scaled)
        err = torch.maximum((matrix.sum(2) - 1).abs().amax(1), (matrix.sum(1) - 1).abs().amax(1))
        done = done | (err < tol)
        if bool(done.all()):
            break
    return matrix


def neural_sort(scores: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """NeuralSort relaxed permutation (Grover et al. 2019): [G, K] -> [G, K, K], row k = rank k (descending).

    P[k, i] = softmax_i( ((K + 1 - 2k) * s_i - SUM_j |s_i - s_j|) / tau ),  k = 1..K
    """
    k = scores.shape[1]
    spread = (scores.unsqueeze(2) - scores.unsqueeze(1)).abs().sum(dim=2)  # [G, K]
    scaling = (k + 1 - 2 * torch.arange(1, k + 1, device=scores.device, dtype=scores.dtype)).view(1, k, 1)
    logits = (scaling * scores.unsqueeze(1) - spread.unsqueeze(1)) / tau
    return torch.softmax(logits, dim=2)


@register("ppa_ndcg", family="ppa", instances=("group",), arxiv="2410.04346")
def ppa_ndcg_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    beta: float = 0.1,
    tau: float = 1.0,
    sinkhorn_iters: int = 50,
    sinkhorn_tol: float = 1e-6,
) -> tuple[torch.Tensor, Metrics]:
    """PPA / OPO: differentiable NeuralNDCG (Zhao et al., arXiv 2410.04346;
    zhaoyang02/ordinal-preference-optimization `neuralNDCG_loss`).

    s_i = beta * (logp(y_i) - ref(y_i));  P = sinkhorn(neural_sort(s, tau));  g = P @ (2^psi - 1)
    NDCG = SUM_k g_k / log2(k + 1) / IDCG,  IDCG = the same sum over the gains sorted descending
    L = -NDCG  (0 for a group whose gains are all 0)

    Inputs: `logps`, `ref_logps` [G*K] token sums; `rewards` [G, K] graded scores psi.
    Defaults: beta 0.1, tau 1.0, Sinkhorn 50 iterations / tol 1e-6. Returns per-group losses [G].
    """
    s = beta * _grouped(logps - ref_logps, rewards)
    k = rewards.shape[1]
    gains = 2.0 ** rewards.to(s.dtype) - 1
    perm = sinkhorn(neural_sort(s, tau), sinkhorn_iters, sinkhorn_tol)
    expected = torch.bmm(perm, gains.unsqueeze(2)).squeeze(2)  # [G, K]: expected gain at rank k
    discount = 1 / torch.log2(torch.arange(2, k + 2, device=s.device, dtype=s.dtype))
    dcg = (expected * discount).sum(dim=1)
    ideal = (torch.sort(gains, dim=1, descending=True).values * discount).sum(dim=1)
    ndcg = torch.where(ideal > 0, dcg / ideal.clamp(min=1e-12), torch.zeros_like(dcg))
    return -ndcg, {"ndcg": ndcg.detach().mean()}
