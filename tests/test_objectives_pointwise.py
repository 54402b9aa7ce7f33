"""Point-wise objectives (methods.md section 2) against plain float64 references (lists, math module)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from alignpipe.optimization.objectives import OBJECTIVES
from alignpipe.optimization.objectives.pointwise import astar_values, running_mean_update

DT = torch.float64
B = 7


def lsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def make_point_batch(seed: int = 0, k: int = 3) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    labels = [rng.random() < 0.5 for _ in range(B)]
    labels[0], labels[1] = True, False  # both kinds present

    def vec(lo: float, hi: float) -> torch.Tensor:
        return torch.tensor([rng.uniform(lo, hi) for _ in range(B)], dtype=DT)

    return {
        "logps": vec(-40, -2), "ref_logps": vec(-40, -2),
        "kl_logps": vec(-40, -2), "ref_kl_logps": vec(-45, -5),
        "lengths": torch.tensor([rng.randint(1, 30) for _ in range(B)]),
        "labels": torch.tensor(labels),
        "scores": vec(-1, 1), "optimal_values": vec(-0.5, 0.5),
        "predicted_scores": torch.tensor([[rng.uniform(-1, 5) for _ in range(k)] for _ in range(B)], dtype=DT),
        "ratings": torch.tensor([[float(rng.randint(0, 4)) for _ in range(k)] for _ in range(B)], dtype=DT),
        # the chosen side of pairs, for sft and the Bradley-Terry reward model
        "chosen_logps": vec(-40, -2), "chosen_lengths": torch.tensor([rng.randint(1, 30) for _ in range(B)]),
        "chosen_rewards": vec(-3, 3), "rejected_rewards": vec(-3, 3), "margins": vec(0, 2),
    }


def ref_sft(d):
    return [-d["chosen_logps"][i] / d["chosen_lengths"][i] for i in range(B)]


def ref_kto(d, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    z0 = max(0.0, sum(d["kl_logps"][i] - d["ref_kl_logps"][i] for i in range(B)) / B)
    out = []
    for i in range(B):
        r = d["logps"][i] - d["ref_logps"][i]
        if d["labels"][i]:
            out.append(desirable_weight * (1 - sig(beta * (r - z0))))
        else:
            out.append(undesirable_weight * (1 - sig(beta * (z0 - r))))
    return out


def ref_bco(d, beta=0.1, delta=None):
    r = [beta * (d["logps"][i] - d["ref_logps"][i]) for i in range(B)]
    shift = sum(r) / B if delta is None else delta
    return [-lsig(x - shift) if d["labels"][i] else -lsig(-(x - shift)) for i, x in enumerate(r)]


def ref_bt_reward(d, margin_scale=0.0, center_coef=0.01):
    out = []
    for i in range(B):
        rw, rl = d["chosen_rewards"][i], d["rejected_rewards"][i]
        out.append(-lsig(rw - rl - margin_scale * d["margins"][i]) + center_coef * (rw + rl) ** 2)
    return out


def ref_regression_reward(d):
    return [sum((p - s) ** 2 for p, s in zip(d["predicted_scores"][i], d["scores"][i], strict=True)) for i in range(B)]


def ref_apo_star(d, beta=1e-3):
    return [(beta * (d["logps"][i] - d["ref_logps"][i]) - (d["scores"][i] - d["optimal_values"][i])) ** 2
            for i in range(B)]


REFERENCES = {name[4:]: fn for name, fn in globals().items() if name.startswith("ref_") and callable(fn)}

CASES = [
    ("sft", {}),
    ("kto", {}), ("kto", {"beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 0.7}),
    ("bco", {}), ("bco", {"delta": 0.25}),
    ("bt_reward", {}), ("bt_reward", {"margin_scale": 1.0, "center_coef": 0.0}),
    ("regression_reward", {}),
    ("apo_star", {}), ("apo_star", {"beta": 0.05}),
]

TESTED = {name for name, _ in CASES}


def _inputs(name: str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if name == "regression_reward":
        return {**batch, "scores": batch["ratings"]}
    return batch


@pytest.mark.parametrize(("name", "params"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(name: str, params: dict, seed: int) -> None:
    batch = _inputs(name, make_point_batch(seed))
    losses, metrics = OBJECTIVES[name](batch, **params)
    expected = REFERENCES[name]({k: v.tolist() for k, v in batch.items()}, **params)
    assert losses.shape == (B,)
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=DT), rtol=1e-9, atol=1e-6)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


def test_kto_reference_point_is_clamped_and_detached() -> None:
    batch = make_point_batch(2)
    kl = (batch["ref_kl_logps"] - 5).requires_grad_(True)  # mean KL < 0: z0 = 0
    logps = batch["logps"].clone().requires_grad_(True)
    losses, metrics = OBJECTIVES["kto"]({**batch, "kl_logps": kl, "logps": logps})
    assert metrics["kl_z0"] == 0
    losses.sum().backward()
    assert kl.grad is None
    desirable = batch["labels"]
    assert (logps.grad[desirable] < 0).all() and (logps.grad[~desirable] > 0).all()


def test_bco_shift_is_detached() -> None:
    batch = make_point_batch(3)
    logps = batch["logps"].clone().requires_grad_(True)
    OBJECTIVES["bco"]({**batch, "logps": logps})[0].sum().backward()
    d = {k: v.tolist() for k, v in batch.items()}
    r = [0.1 * (d["logps"][i] - d["ref_logps"][i]) for i in range(B)]
    shift = sum(r) / B
    expected = [-0.1 * sig(-(x - shift)) if d["labels"][i] else 0.1 * sig(x - shift) for i, x in enumerate(r)]
    torch.testing.assert_close(logps.grad, torch.tensor(expected, dtype=DT))


def test_regression_reward_scalar_head() -> None:
    pred, target = torch.tensor([0.5, 2.0], dtype=DT), torch.tensor([1.0, 1.0], dtype=DT)
    losses, _ = OBJECTIVES["regression_reward"]({"predicted_scores": pred, "scores": target})
    torch.testing.assert_close(losses, torch.tensor([0.25, 1.0], dtype=DT))


def test_astar_values() -> None:
    rng = random.Random(4)
    rewards = [[float(rng.random() < 0.4) for _ in range(8)] for _ in range(5)]
    for beta in (0.5, 2.0):
        expected = [beta * math.log(sum(math.exp(r / beta) for r in row) / len(row)) for row in rewards]
        torch.testing.assert_close(astar_values(torch.tensor(rewards, dtype=DT), beta), torch.tensor(expected, dtype=DT))
    # the soft maximum lies between the mean and the max
    v = astar_values(torch.tensor(rewards, dtype=DT)).tolist()
    assert all(sum(row) / 8 - 1e-12 <= x <= max(row) + 1e-12 for row, x in zip(rewards, v, strict=True))


def test_running_mean_update() -> None:
    values = [0.3, -1.2, 2.5, 0.0, 4.4, -0.7, 1.1]
    mean, count = 0.0, 0
    for chunk in (values[:2], values[2:3], [], values[3:]):
        mean, count = running_mean_update(mean, count, torch.tensor(chunk, dtype=DT))
    assert count == len(values)
    assert math.isclose(mean, sum(values) / len(values), rel_tol=1e-12)
