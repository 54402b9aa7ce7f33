"""Pairwise judges over k candidates: a comparison plan, both orders, per-candidate scores.

Turns a pairwise judge into per-candidate judgments, so point, pair and group instantiation all work
from pairwise verdicts; the raw ordered verdicts are returned as well (they go to judgments.parquet).

Plan (`comparison_plan`). For k candidates there are k(k-1)/2 unordered pairs. Without a budget, or when
they fit it, all pairs are compared. Otherwise the plan is a prefix of a round-robin schedule (circle
method: candidate order shuffled with the seed; k odd adds a bye): whole rounds while they fit, then the
unused pairs whose candidates have played least. With B comparisons every candidate plays floor(2B/k)
or ceil(2B/k) times, no pair twice, and for B >= k-1 the comparison graph is connected (two consecutive
circle rounds form a Hamiltonian cycle), which Bradley-Terry needs to put all candidates on one scale.
`default_budget(k)`: all pairs up to k = 8 (28 comparisons, 56 judge calls), beyond that 4k (every
candidate meets 8 others); `judge_groups(max_comparisons=None)` compares all pairs.

Both orders. Every planned pair (a, b) is asked as (a, b) and as (b, a), all groups in one batched
`judge.compare` call. Each ordered verdict is half a game; "tie" is half a win for each side; a verdict
that is not ok (invalid / error) counts for neither side.

Aggregation. With ordered ok verdicts g involving candidate i, s_g(i) = 1 (i preferred), 1/2 (tie), 0:

- win rate: w_i = sum_g s_g(i) / n_i, n_i = number of those verdicts (the halves cancel), in [0, 1];
- Bradley-Terry: P(i beats j) = sigmoid(t_i - t_j); t maximises
  sum_g 1/2 [s_g(i) log sigmoid(t_i - t_j) + (1 - s_g(i)) log sigmoid(t_j - t_i)] - (l2/2) |t|^2
  (Newton with backtracking; the L2 prior, l2 = 0.01, keeps undefeated candidates and separated
  groups finite), reported as log-strength centred to mean 0 over the group's rated candidates.

Default: win rate. The default plan is all pairs, where the two rank identically (in a complete balanced
round robin the BT MLE is monotone in the win total), and win rate needs no fit, has the [0, 1] scale the
point instantiation's label threshold (0.5: beats the average peer) expects, and maps position-biased or
tied verdicts to exactly 0.5. With a budget below all pairs, use `aggregate="bradley_terry"`: win rate
then depends on which opponents a candidate drew, BT adjusts for it. A candidate with no ok verdict gets
status "invalid" ("error" if all its verdicts errored) and no scores: a failed judgment is no signal.
"""

from __future__ import annotations

import random
from collections import defaultdict
from itertools import combinations
from typing import Literal

import numpy as np

from alignpipe.evaluation.base import PairwiseJudge
from alignpipe.records import Candidate, Judgment, Prompt

ALL_PAIRS_UP_TO = 8
BT_L2 = 0.01
AGGREGATES = ("win_rate", "bradley_terry")
_SWAP = {"first": "second", "second": "first", "tie": "tie"}
_OUTCOME = {"first": 1.0, "second": 0.0, "tie": 0.5}  # for the candidate shown first


def default_budget(k: int) -> int:
    """Recommended `max_comparisons` for groups of k: all pairs up to k = 8, else 4k."""
    return k * (k - 1) // 2 if k <= ALL_PAIRS_UP_TO else 4 * k


def _rounds(order: list[int]) -> list[list[tuple[int, int]]]:
    """Circle-method round robin: n-1 rounds of disjoint pairs (a bye for odd k is dropped)."""
    players: list[int | None] = [*order, None] if len(order) % 2 else list(order)
    n, rounds = len(players), []
    for _ in range(n - 1):
        pairs = [(players[m], players[n - 1 - m]) for m in range(n // 2)]
        rounds.append([(min(a, b), max(a, b)) for a, b in pairs if a is not None and b is not None])
        players = [players[0], players[-1], *players[1:-1]]  # keep the first, rotate the rest
    return rounds


def comparison_plan(k: int, max_comparisons: int | None = None, seed: int = 0) -> list[tuple[int, int]]:
    """Unordered index pairs (i < j) to compare: all pairs within the budget, else a balanced round robin."""
    if k < 0 or (max_comparisons is not None and max_comparisons < 0):
        raise ValueError(f"need k >= 0 and max_comparisons >= 0, got k={k}, max_comparisons={max_comparisons}")
    if max_comparisons is None or max_comparisons >= k * (k - 1) // 2:
        return list(combinations(range(k), 2))
    order = list(range(k))
    random.Random(seed).shuffle(order)
    rounds = _rounds(order)
    plan: list[tuple[int, int]] = []
    played = [0] * k

    def take(pair: tuple[int, int]) -> None:
        plan.append(pair)
        played[pair[0]] += 1
        played[pair[1]] += 1

    for pairs in rounds:  # whole rounds while they fit
        if len(plan) + len(pairs) > max_comparisons:
            break
        for pair in pairs:
            take(pair)
    used = set(plan)
    pool = [(r, m, pair) for r, pairs in enumerate(rounds) for m, pair in enumerate(pairs) if pair not in used]
    while len(plan) < max_comparisons:  # then the least-played candidates, in schedule order
        best = min(pool, key=lambda t: (max(played[t[2][0]], played[t[2][1]]),
                                        played[t[2][0]] + played[t[2][1]], t[0], t[1]))
        pool.remove(best)
        take(best[2])
    return plan


def bradley_terry(k: int, games: list[tuple[int, int, float]], l2: float = BT_L2, iters: int = 100) -> np.ndarray:
    """MAP log-strengths for `games` (i, j, s: i's outcome against j in [0, 1], weight 1/2 each), centred."""
    if k == 0:
        return np.zeros(0)
    idx_i = np.array([g[0] for g in games], dtype=int)
    idx_j = np.array([g[1] for g in games], dtype=int)
    s = np.array([g[2] for g in games], dtype=np.float64)
    w = 0.5

    def loss(t: np.ndarray) -> float:
        d = t[idx_i] - t[idx_j]
        return float(w * np.sum(s * np.logaddexp(0, -d) + (1 - s) * np.logaddexp(0, d)) + 0.5 * l2 * t @ t)

    t = np.zeros(k)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(t[idx_i] - t[idx_j])))
        r = w * (p - s)  # d loss / d (t_i - t_j)
        grad = l2 * t + np.bincount(idx_i, r, k) - np.bincount(idx_j, r, k)
        h = w * p * (1 - p)
        hess = l2 * np.eye(k)
        np.add.at(hess, (idx_i, idx_i), h)
        np.add.at(hess, (idx_j, idx_j), h)
        np.add.at(hess, (idx_i, idx_j), -h)
        np.add.at(hess, (idx_j, idx_i), -h)
        step = np.linalg.solve(hess, grad)
        f0, a = loss(t), 1.0
        while loss(t - a * step) > f0 - 1e-4 * a * (grad @ step) and a > 1e-8:
            a /= 2
        t = t - a * step
        if np.max(np.abs(a * step)) < 1e-12:
            break
    return t - t.mean()


def _not_ok_judgment(prompt_id: str, cand: Candidate, name: str, statuses: list[str]) -> Judgment:
    if not statuses:
        return Judgment(prompt_id, [cand.id], name, status="invalid", reason="no comparison planned")
    n_err = statuses.count("error")
    status = "error" if n_err == len(statuses) else "invalid"
    reason = f"no ok comparison ({n_err} error, {len(statuses) - n_err} invalid)"
    return Judgment(prompt_id, [cand.id], name, status=status, reason=reason)


def judge_groups(
    judge: PairwiseJudge, groups: list[tuple[Prompt, list[Candidate]]], *, max_comparisons: int | None = None,
    aggregate: Literal["win_rate", "bradley_terry"] = "win_rate", seed: int = 0, both_orders: bool = True,
) -> tuple[list[Judgment], list[Judgment]]:
    """Per-candidate judgments (in candidate order, group by group) and the raw ordered pairwise verdicts.

    Every planned pair is asked in both orders, (a, b) then (b, a), in one batched `judge.compare` call.
    `both_orders=False` asks each pair once, in a seeded random order (half the calls; position bias then
    shows up as verdicts, not ties)."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, not {aggregate!r}")
    plans = [comparison_plan(len(cands), max_comparisons, seed) for _, cands in groups]
    flip = random.Random(f"orders:{seed}")
    orders = [[((i, j), (j, i)) if both_orders else (((i, j),) if flip.random() < 0.5 else ((j, i),))
               for i, j in plan] for plan in plans]
    items: list[tuple[Prompt, Candidate, Candidate]] = []
    for (prompt, cands), group_orders in zip(groups, orders, strict=True):
        for pair_orders in group_orders:
            items += [(prompt, cands[a], cands[b]) for a, b in pair_orders]
    raw = judge.compare(items) if items else []
    if len(raw) != len(items):
        raise RuntimeError(f"{judge.name} returned {len(raw)} judgments for {len(items)} pairs")

    out: list[Judgment] = []
    pos = 0
    for (prompt, cands), group_orders in zip(groups, orders, strict=True):
        k = len(cands)
        if k == 1:
            out.append(Judgment(prompt.id, [cands[0].id], judge.name, status="invalid",
                                reason="alone: nothing to compare"))
            continue
        games: list[tuple[int, int, float]] = []  # (shown first, shown second, outcome of the first)
        statuses: dict[int, list[str]] = defaultdict(list)
        for pair_orders in group_orders:
            for (a, b), v in zip(pair_orders, raw[pos:pos + len(pair_orders)], strict=True):
                ok = v.status == "ok" and v.preference in _OUTCOME
                statuses[a].append("ok" if ok else v.status)
                statuses[b].append("ok" if ok else v.status)
                if ok:
                    games.append((a, b, _OUTCOME[v.preference]))  # type: ignore[index]
            pos += len(pair_orders)
        rated = sorted({x for a, b, _ in games for x in (a, b)})
        if aggregate == "win_rate":
            won, played = np.zeros(k), np.zeros(k)
            for a, b, s in games:
                won[a] += s
                won[b] += 1 - s
                played[a] += 1
                played[b] += 1
            values = {i: float(won[i] / played[i]) for i in rated}
        else:
            where = {c: n for n, c in enumerate(rated)}
            t = bradley_terry(len(rated), [(where[a], where[b], s) for a, b, s in games])
            values = {c: float(t[n]) for c, n in where.items()}
        for i, cand in enumerate(cands):
            if i in values:
                out.append(Judgment(prompt.id, [cand.id], judge.name, scores={aggregate: values[i]}))
            else:
                out.append(_not_ok_judgment(prompt.id, cand, judge.name, statuses[i]))
    return out, list(raw)


def pairwise_stats(raw: list[Judgment]) -> dict:
    """Counts over raw ordered verdicts: comparisons (ordered verdicts), invalid / error rates, and the
    both-order consistency (share of unordered pairs, both orders ok, whose verdicts agree once the
    swapped one is mapped back; None when no pair had both orders ok)."""
    n = len(raw)
    orders: dict[tuple[str, str, str], list[Judgment]] = defaultdict(list)
    for j in raw:
        if len(j.candidate_ids) == 2:
            orders[(j.prompt_id, *j.candidate_ids)].append(j)  # type: ignore[arg-type]
    agree = decided = 0
    for (pid, a, b), forward in orders.items():
        if a >= b:
            continue  # each unordered pair once, from its lexically first order
        for ab, ba in zip(forward, orders.get((pid, b, a), []), strict=False):
            if ab.status == "ok" and ba.status == "ok" and ab.preference in _SWAP and ba.preference in _SWAP:
                decided += 1
                agree += ab.preference == _SWAP[ba.preference]  # type: ignore[index]
    return {
        "comparisons": n,
        "invalid_rate": sum(j.status == "invalid" for j in raw) / n if n else 0.0,
        "error_rate": sum(j.status == "error" for j in raw) / n if n else 0.0,
        "both_order_consistency": agree / decided if decided else None,
    }
