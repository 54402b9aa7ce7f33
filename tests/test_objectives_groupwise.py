"""Group-wise and list-wise objectives (methods.md sections 2.3-2.5, 3) against plain float64 references.

The references loop over Python lists with the math module; they never call the code under test.
"""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from alignpipe.optimization.objectives import OBJECTIVES
from alignpipe.optimization.objectives.rl import dynamic_sampling_mask, gae, masked_whiten, overlong_penalty

DT = torch.float64
G, K, T = 3, 4, 7
N = G * K


def lsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def make_group_batch(seed: int = 0, grades: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor a group objective may read. Token tensors hold small garbage off the mask."""
    rng = random.Random(seed)
    lengths = [rng.randint(1, T - 2) for _ in range(N)]
    starts = [rng.randint(0, T - n) for n in lengths]
    mask = [[1 if s <= t < s + n else 0 for t in range(T)] for s, n in zip(starts, lengths, strict=True)]

    def tokens(lo: float, hi: float) -> torch.Tensor:
        return torch.tensor([[rng.uniform(lo, hi) if m else rng.uniform(-1, 0) for m in row] for row in mask], dtype=DT)

    token_logps = tokens(-3, -0.05)
    old = (token_logps + torch.tensor([[rng.uniform(-0.4, 0.4) for _ in range(T)] for _ in range(N)], dtype=DT))
    old = torch.minimum(old, torch.full_like(old, -0.01))
    if grades:
        rewards = [[float(rng.randint(0, 3)) for _ in range(K)] for _ in range(G)]
    else:
        rewards = [[rng.uniform(0, 2) for _ in range(K)] for _ in range(G)]
    return {
        "token_logps": token_logps, "old_token_logps": old, "ref_token_logps": tokens(-3, -0.05),
        "completion_mask": torch.tensor(mask, dtype=torch.long),
        "rewards": torch.tensor(rewards, dtype=DT),
        "values": tokens(-1, 1), "old_values": tokens(-1, 1),
        "cost_values": tokens(-1, 1), "old_cost_values": tokens(-1, 1),
        "costs": torch.tensor([[rng.uniform(-2, 2) for _ in range(K)] for _ in range(G)], dtype=DT),
        "baseline_rewards": torch.tensor([rng.uniform(0, 2) for _ in range(G)], dtype=DT),
        "logps": torch.tensor([-rng.uniform(2, 30) for _ in range(N)], dtype=DT),
        "ref_logps": torch.tensor([-rng.uniform(2, 30) for _ in range(N)], dtype=DT),
        "lengths": torch.tensor([rng.randint(2, 25) for _ in range(N)]),
    }


# --- helpers of the references ---------------------------------------------------------------------

def _advantages(rewards, scale=True):
    out = []
    for row in rewards:
        mean = sum(row) / len(row)
        sd = statistics.stdev(row)
        out.extend([(r - mean) / (sd + 1e-4) if scale else r - mean for r in row])
    return out


def _clip(x, lo, hi):
    return min(max(x, lo), hi)


def _surrogate(ratio, adv, eps_low, eps_high):
    return -min(ratio * adv, _clip(ratio, 1 - eps_low, 1 + eps_high) * adv)


def _valid(d, i):
    return [t for t in range(T) if d["completion_mask"][i][t]]


def _total_tokens(d):
    return sum(len(_valid(d, i)) for i in range(N))


# --- references -------------------------------------------------------------------------------------

def ref_grpo(d, epsilon=0.2, beta=0.04, kl_estimator="k3", aggregation="sequence"):
    adv = _advantages(d["rewards"])
    out = []
    for i in range(N):
        total = 0.0
        for t in _valid(d, i):
            lp, old, ref = d["token_logps"][i][t], d["old_token_logps"][i][t], d["ref_token_logps"][i][t]
            a = ref - lp
            kl = {"k1": -a, "k2": 0.5 * a * a, "k3": math.exp(a) - a - 1}[kl_estimator]
            total += _surrogate(math.exp(lp - old), adv[i], epsilon, epsilon) + beta * kl
        out.append(total / len(_valid(d, i)) if aggregation == "sequence" else total * N / _total_tokens(d))
    return out


def ref_dr_grpo(d, epsilon=0.2, max_completion_length=None):
    adv = _advantages(d["rewards"], scale=False)
    l_max = max_completion_length or max(len(_valid(d, i)) for i in range(N))
    return [sum(_surrogate(math.exp(d["token_logps"][i][t] - d["old_token_logps"][i][t]), adv[i], epsilon, epsilon)
                for t in _valid(d, i)) / l_max for i in range(N)]


def ref_dapo(d, eps_low=0.2, eps_high=0.28):
    adv = _advantages(d["rewards"])
    return [sum(_surrogate(math.exp(d["token_logps"][i][t] - d["old_token_logps"][i][t]), adv[i], eps_low, eps_high)
                for t in _valid(d, i)) * N / _total_tokens(d) for i in range(N)]


def ref_gspo(d, eps_low=3e-4, eps_high=4e-4):
    adv = _advantages(d["rewards"])
    out = []
    for i in range(N):
        valid = _valid(d, i)
        s = math.exp(sum(d["token_logps"][i][t] - d["old_token_logps"][i][t] for t in valid) / len(valid))
        out.append(_surrogate(s, adv[i], eps_low, eps_high))
    return out


def ref_rloo(d, beta=0.05, epsilon=0.2, normalize_advantages=False):
    totals = []
    for i in range(N):
        kl = sum(d["old_token_logps"][i][t] - d["ref_token_logps"][i][t] for t in _valid(d, i))
        totals.append(d["rewards"][i // K][i % K] - beta * kl)
    adv = []
    for i in range(N):
        others = [totals[g * K + j] for g in [i // K] for j in range(K) if g * K + j != i]
        adv.append(totals[i] - sum(others) / (K - 1))
    if normalize_advantages:
        mean, sd = statistics.fmean(adv), statistics.stdev(adv)
        adv = [(a - mean) / (sd + 1e-4) for a in adv]
    out = []
    for i in range(N):
        ratio = math.exp(sum(d["token_logps"][i][t] - d["old_token_logps"][i][t] for t in _valid(d, i)))
        out.append(max(-adv[i] * ratio, -adv[i] * _clip(ratio, 1 - epsilon, 1 + epsilon)))
    return out


def ref_remax(d, beta=0.05, gamma=0.99, reward_clip=5.0):
    out = []
    for i in range(N):
        a = _clip(d["rewards"][i // K][i % K] - d["baseline_rewards"][i // K], -reward_clip, reward_clip)
        valid = _valid(d, i)
        total = 0.0
        for t_index, t in enumerate(valid, start=1):
            lp = d["token_logps"][i][t]
            ret = -beta * (lp - d["ref_token_logps"][i][t]) + gamma ** (len(valid) - t_index + 1) * a
            total += -ret * lp
        out.append(total * N / _total_tokens(d))
    return out


def _gae_row(rewards, values, gamma, lam):
    adv, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        adv[t] = running
    return adv


def _ppo_advantages(d, scores, old_values_key, beta, gamma, lam, whiten):
    """Shaped per-token rewards (k1 KL, score on the last token), GAE, batch whitening; (adv, returns)."""
    advs, rets = [], []
    for i in range(N):
        valid = _valid(d, i)
        rewards = [(-beta * (d["old_token_logps"][i][t] - d["ref_token_logps"][i][t]) if t in valid else 0.0)
                   for t in range(T)]
        rewards[valid[-1]] += scores[i]
        values = [d[old_values_key][i][t] if t in valid else 0.0 for t in range(T)]
        adv = _gae_row(rewards, values, gamma, lam)
        advs.append(adv)
        rets.append([a + v for a, v in zip(adv, values, strict=True)])
    if whiten:
        flat = [advs[i][t] for i in range(N) for t in _valid(d, i)]
        mean, var = statistics.fmean(flat), statistics.variance(flat)
        advs = [[(a - mean) / math.sqrt(var + 1e-8) for a in row] for row in advs]
    return advs, rets


def _value_loss(v, v_old, ret, clip):
    v_clipped = v_old + _clip(v - v_old, -clip, clip)
    return 0.5 * max((v - ret) ** 2, (v_clipped - ret) ** 2)


def ref_ppo(d, beta=0.05, kl_estimator="k1", epsilon=0.2, value_clip=0.2, vf_coef=0.1, gamma=1.0, lam=0.95,
            whiten_advantages=True):
    scores = [r for row in d["rewards"] for r in row]
    advs, rets = _ppo_advantages(d, scores, "old_values", beta, gamma, lam, whiten_advantages)
    out = []
    for i in range(N):
        total = 0.0
        for t in _valid(d, i):
            ratio = math.exp(d["token_logps"][i][t] - d["old_token_logps"][i][t])
            a = advs[i][t]
            policy = max(-a * ratio, -a * _clip(ratio, 1 - epsilon, 1 + epsilon))
            total += policy + vf_coef * _value_loss(d["values"][i][t], d["old_values"][i][t], rets[i][t], value_clip)
        out.append(total * N / _total_tokens(d))
    return out


def ref_rrhf(d, rank_weight=1.0, length_penalty=1.0):
    out = []
    for g in range(G):
        idx = range(g * K, (g + 1) * K)
        p = [d["logps"][i] / d["lengths"][i] ** length_penalty for i in idx]
        r = d["rewards"][g]
        rank = sum(max(0.0, p[i] - p[j]) for i in range(K) for j in range(K) if r[i] < r[j])
        best = max(range(K), key=lambda k: r[k])
        out.append(rank_weight * rank - d["logps"][g * K + best] / d["lengths"][g * K + best])
    return out


def ref_pro(d, sft_weight=0.05, reward_temperatures=True):
    out = []
    for g in range(G):
        order = sorted(range(K), key=lambda k: -d["rewards"][g][k])
        s = [d["logps"][g * K + k] / d["lengths"][g * K + k] for k in order]
        r = [d["rewards"][g][k] for k in order]
        total = 0.0
        for k in range(K - 1):
            temps = [r[k] - r[i] if reward_temperatures else 1.0 for i in range(k + 1, K)]
            top = max(temps)
            logits = [s[k] * top] + [s[i] * tmp for i, tmp in zip(range(k + 1, K), temps, strict=True)]
            biggest = max(logits)
            total += biggest + math.log(sum(math.exp(x - biggest) for x in logits)) - logits[0]
        out.append(total + sft_weight * (K - 1) ** 2 * -d["logps"][g * K + order[0]])
    return out


def ref_lipo_lambda(d, beta=0.05):
    out = []
    for g in range(G):
        s = [beta * (d["logps"][g * K + k] - d["ref_logps"][g * K + k]) for k in range(K)]
        psi = d["rewards"][g]
        by_score = sorted(range(K), key=lambda k: -s[k])
        rank = {k: pos + 1 for pos, k in enumerate(by_score)}
        total = 0.0
        for i in range(K):
            for j in range(K):
                if psi[i] > psi[j]:
                    delta = abs((2 ** psi[i] - 1) - (2 ** psi[j] - 1)) * abs(1 / math.log(1 + rank[i]) - 1 / math.log(1 + rank[j]))
                    total -= delta * lsig(s[i] - s[j])
        out.append(total)
    return out


def _sinkhorn(p, max_iter=50, tol=1e-6):
    for _ in range(max_iter):
        cols = [sum(p[r][c] for r in range(K)) for c in range(K)]
        p = [[p[r][c] / cols[c] for c in range(K)] for r in range(K)]
        p = [[x / sum(row) for x in row] for row in p]
        err_rows = max(abs(sum(row) - 1) for row in p)
        err_cols = max(abs(sum(p[r][c] for r in range(K)) - 1) for c in range(K))
        if max(err_rows, err_cols) < tol:
            break
    return p


def ref_ppa_ndcg(d, beta=0.1, tau=1.0, sinkhorn_iters=50, sinkhorn_tol=1e-6):
    out = []
    for g in range(G):
        s = [beta * (d["logps"][g * K + k] - d["ref_logps"][g * K + k]) for k in range(K)]
        spread = [sum(abs(s[i] - s[j]) for j in range(K)) for i in range(K)]
        p = []
        for rank in range(1, K + 1):
            logits = [((K + 1 - 2 * rank) * s[i] - spread[i]) / tau for i in range(K)]
            biggest = max(logits)
            z = sum(math.exp(x - biggest) for x in logits)
            p.append([math.exp(x - biggest) / z for x in logits])
        p = _sinkhorn(p, sinkhorn_iters, sinkhorn_tol)
        gains = [2 ** x - 1 for x in d["rewards"][g]]
        dcg = sum(sum(p[r][i] * gains[i] for i in range(K)) / math.log2(r + 2) for r in range(K))
        idcg = sum(x / math.log2(r + 2) for r, x in enumerate(sorted(gains, reverse=True)))
        out.append(-dcg / idcg if idcg > 0 else 0.0)
    return out


REFERENCES = {name[4:]: fn for name, fn in globals().items() if name.startswith("ref_") and callable(fn)}

CASES = [
    ("grpo", {}), ("grpo", {"aggregation": "token", "kl_estimator": "k2", "beta": 0.3}),
    ("grpo", {"kl_estimator": "k1", "epsilon": 0.05}),
    ("dr_grpo", {}), ("dr_grpo", {"max_completion_length": 16, "epsilon": 0.1}),
    ("dapo", {}), ("dapo", {"eps_low": 0.1, "eps_high": 0.15}),
    ("gspo", {}), ("gspo", {"eps_low": 0.05, "eps_high": 0.1}),
    ("rloo", {}), ("rloo", {"normalize_advantages": True, "beta": 0.5, "epsilon": 0.4}),
    ("remax", {}), ("remax", {"reward_clip": 0.3, "gamma": 0.9, "beta": 0.2}),
    ("ppo", {}), ("ppo", {"whiten_advantages": False, "gamma": 0.9, "lam": 0.8, "vf_coef": 0.5, "value_clip": 0.05}),
    ("rrhf", {}), ("rrhf", {"rank_weight": 100.0, "length_penalty": 0.5}),
    ("pro", {}), ("pro", {"reward_temperatures": False, "sft_weight": 0.5}),
    ("lipo_lambda", {}), ("lipo_lambda", {"beta": 0.2}),
    ("ppa_ndcg", {}), ("ppa_ndcg", {"tau": 0.3, "beta": 0.2}), ("ppa_ndcg", {"sinkhorn_iters": 3}),
]

TESTED = {name for name, _ in CASES}


@pytest.mark.parametrize(("name", "params"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(name: str, params: dict, seed: int) -> None:
    batch = make_group_batch(seed)
    losses, metrics = OBJECTIVES[name](batch, **params)
    expected = REFERENCES[name]({k: v.tolist() for k, v in batch.items()}, **params)
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=DT), rtol=1e-9, atol=1e-6)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


@pytest.mark.parametrize("name", ["lipo_lambda", "ppa_ndcg"])
def test_graded_labels_with_ties(name: str) -> None:
    batch = make_group_batch(2, grades=True)
    losses, _ = OBJECTIVES[name](batch)
    expected = REFERENCES[name]({k: v.tolist() for k, v in batch.items()})
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=DT), rtol=1e-9, atol=1e-6)


GROUP_OBJECTIVES = sorted(n for n, s in OBJECTIVES.items() if "group" in s.instances)
PER_ROW = {"token_logps", "old_token_logps", "ref_token_logps", "completion_mask", "values", "old_values",
           "cost_values", "old_cost_values", "logps", "ref_logps", "lengths"}


@pytest.mark.parametrize("name", GROUP_OBJECTIVES)
def test_permuting_completions_within_groups(name: str) -> None:
    batch = make_group_batch(4)
    rng = random.Random(5)
    perms = [rng.sample(range(K), K) for _ in range(G)]
    rows = torch.tensor([g * K + perms[g][k] for g in range(G) for k in range(K)])
    permuted = {key: value[rows] if key in PER_ROW else value for key, value in batch.items()}
    for key in ("rewards", "costs"):
        permuted[key] = torch.stack([batch[key][g, perms[g]] for g in range(G)])
    losses, _ = OBJECTIVES[name](batch)
    moved, _ = OBJECTIVES[name](permuted)
    if losses.shape == (N,):
        torch.testing.assert_close(moved, losses[rows])
    else:
        assert losses.shape == (G,)
        torch.testing.assert_close(moved, losses)
    torch.testing.assert_close(moved.mean(), losses.mean())


@pytest.mark.parametrize("name", ["grpo", "dapo", "dr_grpo", "gspo", "rloo", "ppo"])
def test_ratio_is_one_on_policy(name: str) -> None:
    batch = make_group_batch(6)
    batch["old_token_logps"] = batch["token_logps"].clone()
    _, metrics = OBJECTIVES[name](batch)
    assert metrics["clip_fraction"] == 0


def test_grpo_on_policy_loss_is_minus_advantage_plus_kl() -> None:
    batch = make_group_batch(7)
    batch["old_token_logps"] = batch["token_logps"].clone()
    batch["ref_token_logps"] = batch["token_logps"].clone()  # KL = 0
    losses, metrics = OBJECTIVES["grpo"](batch)
    expected = [-a for a in _advantages(batch["rewards"].tolist())]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=DT))
    assert metrics["kl"] == 0


@pytest.mark.parametrize("name", ["grpo", "dapo", "dr_grpo", "gspo", "rloo"])
def test_policy_gradient_sign(name: str) -> None:
    """A completion with a positive advantage gains probability: d loss / d logp_t < 0 on its tokens."""
    batch = make_group_batch(8)
    batch["old_token_logps"] = batch["token_logps"].clone()
    batch["ref_token_logps"] = batch["token_logps"].clone()
    logps = batch["token_logps"].clone().requires_grad_(True)
    OBJECTIVES[name]({**batch, "token_logps": logps})[0].mean().backward()
    adv = torch.tensor(_advantages(batch["rewards"].tolist()), dtype=DT)
    mask = batch["completion_mask"].bool()
    grad_sign = torch.sign(logps.grad)
    assert (grad_sign[mask] == -torch.sign(adv).unsqueeze(1).expand_as(mask)[mask]).all()
    assert (logps.grad[~mask] == 0).all()


def test_gae_matches_loop() -> None:
    rng = random.Random(9)
    rewards = [[rng.uniform(-1, 1) for _ in range(T)] for _ in range(3)]
    values = [[rng.uniform(-1, 1) for _ in range(T)] for _ in range(3)]
    adv, ret = gae(torch.tensor(rewards, dtype=DT), torch.tensor(values, dtype=DT), gamma=0.97, lam=0.9)
    expected = [_gae_row(r, v, 0.97, 0.9) for r, v in zip(rewards, values, strict=True)]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=DT))
    torch.testing.assert_close(ret, adv + torch.tensor(values, dtype=DT))


def test_masked_whiten() -> None:
    x = torch.tensor([[1.0, 2.0, 50.0], [3.0, -7.0, 4.0]], dtype=DT)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=DT)
    kept = [1.0, 2.0, 3.0, 4.0]
    mean, var = statistics.fmean(kept), statistics.variance(kept)
    out = masked_whiten(x, mask)
    torch.testing.assert_close(out[mask.bool()], torch.tensor([(v - mean) / math.sqrt(var + 1e-8) for v in kept], dtype=DT))


def test_overlong_penalty_and_dynamic_sampling() -> None:
    lengths = torch.tensor([10, 16, 17, 18, 20, 21, 400])
    out = overlong_penalty(lengths, max_length=20, cache_length=4)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0], dtype=out.dtype))
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.25]])
    assert dynamic_sampling_mask(rewards).tolist() == [False, True, False, True]


def test_rloo_needs_two_completions() -> None:
    batch = make_group_batch(0)
    rows = torch.arange(0, N, K)
    single = {k: v[rows] for k, v in batch.items() if k in PER_ROW}
    with pytest.raises(ValueError):
        OBJECTIVES["rloo"]({**single, "rewards": batch["rewards"][:, :1]})
