"""Point-wise objectives (one completion and its label or score). Formulas: shared methods.md section 2."""

from __future__ import annotations

import torch

from alignpipe.optimization.objectives import Metrics, register


@register("sft", family="sft", instances=("pair",), arxiv="2404.19733")
def sft_loss(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """Negative log-likelihood of the chosen completion, length-normalised per sequence.

    L = -logp(y_w) / |y_w|    (the NLL term of RPO, arXiv 2404.19733: DPO + alpha * NLL)

    Inputs [B]: token-sum log-probs and completion lengths (EOS included). Combine with `dpo` in a
    weighted objective list to get RPO. Returns per-example losses [B].
    """
    nll = -chosen_logps / chosen_lengths.clamp(min=1)
    return nll, {"nll": nll.detach().mean()}
