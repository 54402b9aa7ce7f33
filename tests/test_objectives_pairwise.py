"""Pair-wise objectives against plain float64 references written from methods.md (section 1, App. A).

The references below use Python lists and the math module only; they never call the code under test.
"""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from alignpipe.optimization.objectives import OBJECTIVES
from alignpipe.optimization.objectives.pairwise_reffree import log1mexp
from alignpipe.optimization.objectives.pairwise_tokens import tisdpo_weights

DT = torch.float64
B, T = 6, 9


def lsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def make_pair_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor a pair objective may read, random; token tensors carry garbage off the mask."""
    rng = random.Random(seed)
    out: dict[str, torch.Tensor] = {}
    for side in ("chosen", "rejected"):
        lengths = [rng.randint(1, T - 3) for _ in range(B)]
        starts = [rng.randint(0, T - n) for n in lengths]
        mask = [[1 if s <= t < s + n else 0 for t in range(T)] for s, n in zip(starts, lengths, strict=True)]
        tok = [[-rng.uniform(0.05, 4.0) if m else rng.uniform(-9, 9) for m in row] for row in mask]
        ref_tok = [[-rng.uniform(0.05, 4.0) if m else rng.uniform(-9, 9) for m in row] for row in mask]
        out[f"{side}_mask"] = torch.tensor(mask, dtype=torch.long)
        out[f"{side}_token_logps"] = torch.tensor(tok, dtype=DT)
        out[f"ref_{side}_token_logps"] = torch.tensor(ref_tok, dtype=DT)
        out[f"{side}_token_weights"] = torch.tensor([[rng.uniform(0.5, 1.5) for _ in range(T)] for _ in range(B)], dtype=DT)
        out[f"{side}_token_kl"] = torch.tensor([[rng.uniform(0, 0.8) for _ in range(T)] for _ in range(B)], dtype=DT)
        out[f"{side}_lengths"] = torch.tensor([rng.randint(3, 20) for _ in range(B)], dtype=torch.long)
        out[f"{side}_logps"] = torch.tensor([-rng.uniform(2, 30) for _ in range(B)], dtype=DT)
        out[f"ref_{side}_logps"] = torch.tensor([-rng.uniform(2, 30) for _ in range(B)], dtype=DT)
        out[f"{side}_logsumsq"] = torch.tensor([-rng.uniform(0, 40) for _ in range(B)], dtype=DT)
        out[f"{side}_margin_rewards"] = torch.tensor([[rng.uniform(-2, 2)] for _ in range(B)], dtype=DT)
        out[f"{side}_rewards"] = torch.tensor([rng.uniform(-3, 3) for _ in range(B)], dtype=DT)
        out[f"{side}_costs"] = torch.tensor([rng.uniform(-3, 3) for _ in range(B)], dtype=DT)
        out[f"{side}_unsafe"] = torch.tensor([rng.random() < 0.5 for _ in range(B)])
    out["sampled_logps"] = torch.tensor([-rng.uniform(2, 30) for _ in range(B)], dtype=DT)
    out["ref_sampled_logps"] = torch.tensor([-rng.uniform(2, 30) for _ in range(B)], dtype=DT)
    out["margins"] = torch.tensor([rng.uniform(-1, 2) for _ in range(B)], dtype=DT)
    out["weights"] = torch.ones(B, dtype=DT)
    return out


def swap_sides(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in batch.items():
        if "chosen" in key:
            out[key.replace("chosen", "rejected")] = value
        elif "rejected" in key:
            out[key.replace("rejected", "chosen")] = value
        else:
            out[key] = value
    out["margins"] = -batch["margins"]
    return out


# --- plain references ------------------------------------------------------------------------------

def _lr(d, i):
    return d["chosen_logps"][i] - d["ref_chosen_logps"][i], d["rejected_logps"][i] - d["ref_rejected_logps"][i]


def _h(d, i):
    lr_w, lr_l = _lr(d, i)
    return lr_w - lr_l


def ref_dpo(d, beta=0.1):
    return [-lsig(beta * _h(d, i)) for i in range(B)]


def ref_cdpo(d, beta=0.1, label_smoothing=0.1):
    e = label_smoothing
    return [-(1 - e) * lsig(beta * _h(d, i)) - e * lsig(-beta * _h(d, i)) for i in range(B)]


def ref_robust_dpo(d, beta=0.1, label_smoothing=0.1):
    e = label_smoothing
    return [((1 - e) * -lsig(beta * _h(d, i)) - e * -lsig(-beta * _h(d, i))) / (1 - 2 * e) for i in range(B)]


def ref_ipo(d, beta=0.1, length_normalize=True):
    out = []
    for i in range(B):
        lr_w, lr_l = _lr(d, i)
        if length_normalize:
            lr_w, lr_l = lr_w / d["chosen_lengths"][i], lr_l / d["rejected_lengths"][i]
        out.append((lr_w - lr_l - 1 / (2 * beta)) ** 2)
    return out


def ref_slic_hinge(d, beta=0.1):
    return [max(0.0, 1 - beta * _h(d, i)) for i in range(B)]


def ref_exo_pair(d, beta=0.1, epsilon=1e-3):
    out = []
    for i in range(B):
        z = beta * _h(d, i)
        q = sig(z)
        out.append(q * (lsig(z) - math.log(1 - epsilon)) + (1 - q) * (lsig(-z) - math.log(epsilon)))
    return out


def ref_discopop(d, beta=0.1, tau=0.05):
    out = []
    for i in range(B):
        z = beta * _h(d, i)
        m = sig(z / tau)
        out.append((1 - m) * -lsig(z) + m * math.exp(-z))
    return out


def ref_nca_pair(d, beta=0.1):
    return [-lsig(beta * _lr(d, i)[0]) - 0.5 * lsig(-beta * _lr(d, i)[0]) - 0.5 * lsig(-beta * _lr(d, i)[1]) for i in range(B)]


def ref_bco_pair(d, beta=0.1):
    return [-lsig(beta * _lr(d, i)[0]) - lsig(-beta * _lr(d, i)[1]) for i in range(B)]


def ref_apo_zero(d, beta=0.1):
    return [(1 - sig(beta * _lr(d, i)[0])) + sig(beta * _lr(d, i)[1]) for i in range(B)]


def ref_apo_down(d, beta=0.1):
    return [sig(beta * _lr(d, i)[0]) + (1 - sig(beta * _h(d, i))) for i in range(B)]


def ref_sppo_hard(d, beta=0.1):
    return [(_lr(d, i)[0] - 0.5 / beta) ** 2 + (_lr(d, i)[1] + 0.5 / beta) ** 2 for i in range(B)]


def ref_aot(d, beta=0.1, unpaired=False):
    if unpaired:
        a = sorted(_lr(d, i)[0] for i in range(B))
        b = sorted(_lr(d, i)[1] for i in range(B))
    else:
        a = sorted(d["chosen_logps"][i] - d["rejected_logps"][i] for i in range(B))
        b = sorted(d["ref_chosen_logps"][i] - d["ref_rejected_logps"][i] for i in range(B))
    return [-lsig(beta * (x - y)) for x, y in zip(a, b, strict=True)]


def ref_fdpo(d, beta=0.1, divergence="reverse_kl", alpha=0.5):
    def f(u):
        if divergence == "reverse_kl":
            return u
        if divergence == "forward_kl":
            return 1 - math.exp(-u)
        if divergence == "js":
            return math.log(2) + lsig(u)
        return (math.exp((alpha - 1) * u) - 1) / (alpha - 1)

    return [-lsig(beta * (f(_lr(d, i)[0]) - f(_lr(d, i)[1]))) for i in range(B)]


def _avg(d, i, prefix=""):
    return (d[f"{prefix}chosen_logps"][i] / d["chosen_lengths"][i],
            d[f"{prefix}rejected_logps"][i] / d["rejected_lengths"][i])


def ref_simpo(d, beta=2.0, gamma_beta_ratio=0.25, label_smoothing=0.0, sft_weight=0.0):
    out = []
    for i in range(B):
        avg_w, avg_l = _avg(d, i)
        z = beta * avg_w - beta * avg_l - beta * gamma_beta_ratio
        out.append(-(1 - label_smoothing) * lsig(z) - label_smoothing * lsig(-z) + sft_weight * -avg_w)
    return out


def ref_orpo(d, beta=0.1):
    out = []
    for i in range(B):
        avg_w, avg_l = _avg(d, i)
        odds_w = avg_w - math.log(1 - math.exp(avg_w))
        odds_l = avg_l - math.log(1 - math.exp(avg_l))
        out.append(-avg_w - beta * lsig(odds_w - odds_l))
    return out


def ref_cpo(d, beta=0.1, alpha=1.0):
    return [-lsig(beta * (d["chosen_logps"][i] - d["rejected_logps"][i])) + alpha * -_avg(d, i)[0] for i in range(B)]


def ref_slic(d, delta=1.0, lam=0.1):
    return [max(0.0, delta - d["chosen_logps"][i] + d["rejected_logps"][i]) - lam * d["chosen_logps"][i] for i in range(B)]


def ref_rdpo(d, beta=0.1, alpha=0.05):
    return [-lsig(beta * _h(d, i) + alpha * (d["chosen_lengths"][i] - d["rejected_lengths"][i])) for i in range(B)]


def _wpo(d, beta, label_smoothing, aligned):
    out = []
    for i in range(B):
        sw = d["chosen_logsumsq"][i] if aligned else 0.0
        sl = d["rejected_logsumsq"][i] if aligned else 0.0
        w_w = math.exp((d["chosen_logps"][i] - sw) / d["chosen_lengths"][i])
        w_l = math.exp((d["rejected_logps"][i] - sl) / d["rejected_lengths"][i])
        omega = min(w_w * w_l, 1.0)
        z = beta * _h(d, i)
        out.append(omega * (-(1 - label_smoothing) * lsig(z) - label_smoothing * lsig(-z)))
    return out


def ref_wpo(d, beta=0.01, label_smoothing=0.0):
    return _wpo(d, beta, label_smoothing, aligned=False)


def ref_wpo_aligned(d, beta=0.01, label_smoothing=0.0):
    return _wpo(d, beta, label_smoothing, aligned=True)


def ref_mmpo(d, beta=0.01, gamma=2.2):
    out = []
    for i in range(B):
        p = sig(gamma * d["margins"][i])
        z = beta * _h(d, i)
        out.append(-(p * lsig(z) + (1 - p) * lsig(-z)))
    return out


def ref_alphadpo(d, beta=2.5, gamma_beta_ratio=0.6, alpha=0.2, running_mean=None, running_std=None):
    d_pi = [_avg(d, i)[0] - _avg(d, i)[1] for i in range(B)]
    d_ref = [_avg(d, i, "ref_")[0] - _avg(d, i, "ref_")[1] for i in range(B)]
    m = [p - r for p, r in zip(d_pi, d_ref, strict=True)]
    mu = statistics.fmean(m) if running_mean is None else running_mean
    s = statistics.stdev(m) if running_std is None else running_std
    return [-lsig(beta * (d_pi[i] - alpha * (m[i] - mu) / s - gamma_beta_ratio)) for i in range(B)]


def ref_selm(d, beta=0.01, alpha=0.001):
    return [-lsig(beta * _h(d, i)) + alpha * beta * (d["sampled_logps"][i] - d["ref_sampled_logps"][i]) for i in range(B)]


def _token_sum(d, side, i, weight=lambda t: 1.0, what="lr"):
    total = 0.0
    for t in range(T):
        if d[f"{side}_mask"][i][t]:
            if what == "lr":
                total += weight(t) * (d[f"{side}_token_logps"][i][t] - d[f"ref_{side}_token_logps"][i][t])
            else:
                total += weight(t) * d[f"{side}_token_kl"][i][t]
    return total


def ref_tisdpo(d, beta=0.1):
    out = []
    for i in range(B):
        lw = _token_sum(d, "chosen", i, lambda t, i=i: d["chosen_token_weights"][i][t])
        ll = _token_sum(d, "rejected", i, lambda t, i=i: d["rejected_token_weights"][i][t])
        out.append(-lsig(beta * (lw - ll)))
    return out


def ref_tisdpo_kl(d, beta=0.1, alpha=0.5):
    out = []
    for i in range(B):
        ww = lambda t, i=i: d["chosen_token_weights"][i][t]  # noqa: E731
        wl = lambda t, i=i: d["rejected_token_weights"][i][t]  # noqa: E731
        lw, ll = _token_sum(d, "chosen", i, ww), _token_sum(d, "rejected", i, wl)
        kw, kl = _token_sum(d, "chosen", i, ww, "kl"), _token_sum(d, "rejected", i, wl, "kl")
        out.append(-lsig(beta * ((lw - ll) - alpha * (kw - kl))))
    return out


def ref_tdpo1(d, beta=0.1):
    return [-lsig(beta * (_h(d, i) - (_token_sum(d, "rejected", i, what="kl") - _token_sum(d, "chosen", i, what="kl"))))
            for i in range(B)]


def ref_tdpo2(d, beta=0.1, alpha=0.5):
    return [-lsig(beta * (_h(d, i) - alpha * (_token_sum(d, "rejected", i, what="kl") - _token_sum(d, "chosen", i, what="kl"))))
            for i in range(B)]


def ref_lddpo(d, beta=0.1, alpha=0.5):
    out = []
    for i in range(B):
        public = min(sum(d["chosen_mask"][i]), sum(d["rejected_mask"][i]))
        sums = []
        for side in ("chosen", "rejected"):
            count, total = 0, 0.0
            for t in range(T):
                if d[f"{side}_mask"][i][t]:
                    count += 1
                    weight = 1.0 if count <= public else alpha
                    total += weight * (d[f"{side}_token_logps"][i][t] - d[f"ref_{side}_token_logps"][i][t])
            sums.append(total)
        out.append(-lsig(beta * (sums[0] - sums[1])))
    return out


REFERENCES = {name[4:]: fn for name, fn in globals().items() if name.startswith("ref_") and callable(fn)}

CASES = [
    ("dpo", {}), ("dpo", {"beta": 0.5}),
    ("cdpo", {}), ("cdpo", {"label_smoothing": 0.3}),
    ("robust_dpo", {}), ("robust_dpo", {"label_smoothing": 0.25, "beta": 0.2}),
    ("ipo", {}), ("ipo", {"length_normalize": False, "beta": 0.5}),
    ("slic_hinge", {}), ("slic_hinge", {"beta": 0.03}),
    ("exo_pair", {}), ("exo_pair", {"epsilon": 0.1}),
    ("discopop", {}), ("discopop", {"tau": 1.0}),
    ("nca_pair", {}), ("bco_pair", {}), ("apo_zero", {}), ("apo_down", {}), ("sppo_hard", {}),
    ("aot", {}), ("aot", {"unpaired": True}),
    ("fdpo", {}), ("fdpo", {"divergence": "forward_kl"}), ("fdpo", {"divergence": "js"}),
    ("fdpo", {"divergence": "alpha"}), ("fdpo", {"divergence": "alpha", "alpha": 0.3}),
    ("simpo", {}), ("simpo", {"label_smoothing": 0.1, "sft_weight": 0.5, "beta": 2.5, "gamma_beta_ratio": 0.55}),
    ("orpo", {}), ("orpo", {"beta": 0.5}),
    ("cpo", {}), ("cpo", {"alpha": 0.0}),
    ("slic", {}), ("slic", {"delta": 5.0, "lam": 0.5}),
    ("rdpo", {}), ("rdpo", {"alpha": -0.1}),
    ("wpo", {}), ("wpo", {"label_smoothing": 0.2, "beta": 0.1}), ("wpo_aligned", {}),
    ("mmpo", {}), ("mmpo", {"gamma": 0.3, "beta": 0.1}),
    ("alphadpo", {}), ("alphadpo", {"running_mean": 0.1, "running_std": 0.5}),
    ("selm", {}), ("selm", {"alpha": 0.5}),
    ("tisdpo", {}), ("tisdpo_kl", {}), ("tisdpo_kl", {"alpha": 2.0}),
    ("tdpo1", {}), ("tdpo2", {}), ("tdpo2", {"alpha": 1.5}),
    ("lddpo", {}), ("lddpo", {"alpha": 0.0}),
]

TESTED = {name for name, _ in CASES} | {"bt_reward", "modpo", "safe_rlhf_cost"}  # + the swap test below


@pytest.mark.parametrize(("name", "params"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(name: str, params: dict, seed: int) -> None:
    batch = make_pair_batch(seed)
    losses, metrics = OBJECTIVES[name](batch, **params)
    expected = REFERENCES[name]({k: v.tolist() for k, v in batch.items()}, **params)
    assert losses.shape == (B,)
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=DT), rtol=1e-9, atol=1e-6)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


def test_dpo_at_zero_logit_is_log2() -> None:
    x = torch.tensor([-3.0, -12.5], dtype=DT)
    batch = {"chosen_logps": x, "rejected_logps": x - 1, "ref_chosen_logps": x, "ref_rejected_logps": x - 1}
    losses, metrics = OBJECTIVES["dpo"](batch)
    torch.testing.assert_close(losses, torch.full((2,), math.log(2), dtype=DT))
    assert metrics["margin"] == 0


PAIR_OBJECTIVES = sorted(n for n, s in OBJECTIVES.items() if "pair" in s.instances and n != "sft")


@pytest.mark.parametrize("name", PAIR_OBJECTIVES)
def test_swapping_chosen_and_rejected_flips_margin(name: str) -> None:
    batch = make_pair_batch(3)
    _, metrics = OBJECTIVES[name](batch)
    _, swapped = OBJECTIVES[name](swap_sides(batch))
    assert "margin" in metrics
    assert abs(metrics["margin"].item()) > 1e-9
    torch.testing.assert_close(swapped["margin"], -metrics["margin"])


REFERENCE_FREE = {"simpo", "orpo", "cpo", "slic", "sft", "bt_reward", "safe_rlhf_cost", "regression_reward",
                  "rrhf", "pro", "dapo", "dr_grpo", "gspo"}


def test_reference_needs() -> None:
    for name, spec in OBJECTIVES.items():
        assert spec.needs_reference is (name not in REFERENCE_FREE), name
        if name in REFERENCE_FREE:
            assert not any(i.startswith("ref_") for i in spec.inputs)


def test_dpo_gradient_sign() -> None:
    batch = make_pair_batch(5)
    chosen = batch["chosen_logps"].clone().requires_grad_(True)
    rejected = batch["rejected_logps"].clone().requires_grad_(True)
    losses, _ = OBJECTIVES["dpo"]({**batch, "chosen_logps": chosen, "rejected_logps": rejected})
    losses.mean().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    # d/dlogp_w of -logsig(beta h) = -beta * sigmoid(-beta h), per pair (mean over B)
    h = [_h({k: v.tolist() for k, v in batch.items()}, i) for i in range(B)]
    expected = torch.tensor([-0.1 * sig(-0.1 * x) / B for x in h], dtype=DT)
    torch.testing.assert_close(chosen.grad, expected)


def test_simpo_gradient_sign() -> None:
    batch = make_pair_batch(6)
    chosen = batch["chosen_logps"].clone().requires_grad_(True)
    OBJECTIVES["simpo"]({**batch, "chosen_logps": chosen})[0].sum().backward()
    assert (chosen.grad < 0).all()


def test_stop_gradients() -> None:
    """WPO weights, the AlphaDPO margin and TDPO2's chosen SeqKL are constants of the loss (App. B.4)."""
    batch = make_pair_batch(7)
    chosen = batch["chosen_logps"].clone().requires_grad_(True)
    wpo, _ = OBJECTIVES["wpo"]({**batch, "chosen_logps": chosen})
    wpo.sum().backward()
    d = {k: v.tolist() for k, v in batch.items()}
    omega = [min(math.exp(d["chosen_logps"][i] / d["chosen_lengths"][i] + d["rejected_logps"][i] / d["rejected_lengths"][i]), 1)
             for i in range(B)]
    expected = torch.tensor([-omega[i] * 0.01 * sig(-0.01 * _h(d, i)) for i in range(B)], dtype=DT)
    torch.testing.assert_close(chosen.grad, expected)

    chosen = batch["chosen_logps"].clone().requires_grad_(True)
    OBJECTIVES["alphadpo"]({**batch, "chosen_logps": chosen})[0].sum().backward()
    d_pi = [_avg(d, i)[0] - _avg(d, i)[1] for i in range(B)]
    m = [d_pi[i] - (_avg(d, i, "ref_")[0] - _avg(d, i, "ref_")[1]) for i in range(B)]
    mu, s = statistics.fmean(m), statistics.stdev(m)
    z = [2.5 * (d_pi[i] - 0.2 * (m[i] - mu) / s - 0.6) for i in range(B)]
    expected = torch.tensor([-2.5 * sig(-z[i]) / d["chosen_lengths"][i] for i in range(B)], dtype=DT)
    torch.testing.assert_close(chosen.grad, expected)

    for name, moves in (("tdpo1", True), ("tdpo2", False)):
        kl = batch["chosen_token_kl"].clone().requires_grad_(True)
        chosen = batch["chosen_logps"].clone().requires_grad_(True)
        OBJECTIVES[name]({**batch, "chosen_token_kl": kl, "chosen_logps": chosen})[0].sum().backward()
        assert (kl.grad is not None and bool(kl.grad.abs().sum() > 0)) is moves, name


def test_orpo_is_finite_near_probability_one() -> None:
    x = torch.tensor([-1e-9, 0.0, -1e-3], dtype=torch.float32, requires_grad=True)
    batch = {"chosen_logps": x, "rejected_logps": torch.tensor([-5.0, -2.0, -1e-4]),
             "chosen_lengths": torch.ones(3, dtype=torch.long), "rejected_lengths": torch.ones(3, dtype=torch.long)}
    losses, _ = OBJECTIVES["orpo"](batch)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(x.grad).all()
    y = torch.tensor([-1e-8, -0.3, -5.0, -40.0], dtype=DT)
    torch.testing.assert_close(log1mexp(y), torch.tensor([math.log(-math.expm1(v)) for v in y.tolist()], dtype=DT))


def test_tisdpo_weights_threshold_and_scale() -> None:
    scores = torch.tensor([-3.0, -1.5, 0.0, 0.75, 1.5, 9.0], dtype=DT)
    torch.testing.assert_close(tisdpo_weights(scores), torch.tensor([0.7, 0.7, 1.0, 1.15, 1.3, 1.3], dtype=DT))


def test_invalid_hyperparameters_raise() -> None:
    batch = make_pair_batch(0)
    with pytest.raises(ValueError):
        OBJECTIVES["robust_dpo"](batch, label_smoothing=0.5)
    with pytest.raises(ValueError):
        OBJECTIVES["fdpo"](batch, divergence="hellinger")
    with pytest.raises(ValueError):
        OBJECTIVES["exo_pair"](batch, epsilon=0.0)
