"""What a round's updates did to the signal: the implicit reward and the drift from the reference.

Measured on the round's own examples with the policy before its first step and after its last one, so the
report can show "the pairs the policy got wrong before the round, and after it":

- implicit reward of a completion (DPO, arXiv 2305.18290): r(y) = beta * (log pi(y|x) - log ref(y|x)),
  token sums; on pairs the accuracy is the share with r(y_w) > r(y_l), ties half, and the margin is the mean of
  r(y_w) - r(y_l). `beta` is the recipe's first objective's beta (0.1 where none has one).
- KL to the reference, the k1 estimate on the round's completions: mean over completions of the token sum of
  log pi - log ref. The completions were sampled from the round-start policy, so it is an estimate of the
  sequence KL only for on-policy data; it is reported to watch the drift, not as an exact KL.

Two no-grad passes over the round's rows (before and after); the reference log-probs are the ones the trainer
already computed for the round.
"""

from __future__ import annotations

from typing import Any

import torch


def _sums(token_values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([v.float().sum() for v in token_values])


def implicit_reward_signal(kind: str, policy_token_logps: list[torch.Tensor], ref_token_logps: list[torch.Tensor],
                           beta: float) -> dict[str, float]:
    """Accuracy and margin of the implicit reward (pairs), and the k1 KL estimate, from per-row completion
    token log-probs in the `Instances.flat_rows()` order (pairs: chosen, rejected per example; points: the
    completion and its mismatched partner; groups: the group's completions)."""
    ratio = _sums(policy_token_logps) - _sums(ref_token_logps)
    if kind == "point":  # every second row is a mismatched completion for KTO's z0, not a sample
        ratio = ratio[0::2]
    out = {"kl_ref": ratio.mean().item()}
    if kind == "pair":
        chosen, rejected = beta * ratio[0::2], beta * ratio[1::2]
        # a tie (the policy still equal to its reference, as before a fresh LoRA's first step) counts half
        out["reward_acc"] = ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean().item()
        out["reward_margin"] = (chosen - rejected).mean().item()
    return out


def objective_beta(terms: list[tuple[str, float, dict[str, Any]]]) -> float:
    """The beta of the first objective that has one (the scale of its implicit reward), else 0.1."""
    for _name, _weight, params in terms:
        if isinstance(params.get("beta"), (int, float)):
            return float(params["beta"])
    return 0.1


def labelled(signal: dict[str, float], when: str) -> dict[str, float]:
    """`{"reward_acc": ..}` -> `{"reward_acc_before": ..}`."""
    return {f"{k}_{when}": v for k, v in signal.items()}
