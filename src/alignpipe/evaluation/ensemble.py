"""Ensembles of judges (methods.md 5.1; DESIGN "ensemble (mean, vote, meta-judge)").

- `MeanEnsemble`: pointwise; mean or median of the members' scores, per criterion.
- `VoteEnsemble`: pairwise; majority vote of the members' preferences, ties handled explicitly.
- `WeightedEnsemble`: pairwise; `P(first > second) = sigmoid(sum_k w_k d_k)` where `d_k` is member k's
  score difference (pointwise) or verdict in {+1, 0, -1} (pairwise); `w` is fitted on human labels by
  L2-regularised logistic regression without intercept (so swapping the two candidates gives 1 - p).
- `MetaJudge`: pairwise; takes the members' verdict when they agree, and asks an arbiter otherwise.

Pointwise members take part in pairwise ensembles through `PairwiseFromPointwise` (higher score wins;
equal = tie). Every ensemble keeps its members' judgments, as JSON, in `Judgment.raw`.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict
from typing import Any

import numpy as np

from alignpipe.records import Candidate, Judgment, Prompt

Pair = tuple[Prompt, Candidate, Candidate]


def is_pairwise(judge: Any) -> bool:
    return callable(getattr(judge, "compare", None))


def safe_call(judge: Any, method: str, items: list) -> list[Judgment]:
    """The judge's judgments, or one error judgment per item if the call itself raises."""
    try:
        out = getattr(judge, method)(items)
        if len(out) != len(items):
            raise RuntimeError(f"returned {len(out)} judgments for {len(items)} items")
        return out
    except Exception as exc:  # noqa: BLE001 - a crashed member is an error verdict, not a lost batch
        reason = f"{type(exc).__name__}: {exc}"
        return [Judgment(prompt_id=it[0].id, candidate_ids=[c.id for c in it[1:]], judge=judge.name,
                         status="error", reason=reason) for it in items]


def _failed_status(judgments: list[Judgment]) -> str:
    return "error" if judgments and all(j.status == "error" for j in judgments) else "invalid"


def main_score(j: Judgment, criterion: str | None = None) -> float | None:
    """One number from a pointwise judgment: `criterion`, else the only score, else `overall`, else the mean."""
    if j.status != "ok" or not j.scores:
        return None
    if criterion is not None:
        v = j.scores.get(criterion)
    elif len(j.scores) == 1:
        v = next(iter(j.scores.values()))
    elif "overall" in j.scores:
        v = j.scores["overall"]
    else:
        v = sum(j.scores.values()) / len(j.scores)
    return float(v) if v is not None and math.isfinite(v) else None


def _dump(members: list[Judgment], **extra: Any) -> str:
    return json.dumps({"members": [asdict(j) for j in members], **extra}, default=str)


class PairwiseFromPointwise:
    """A pointwise judge used as a pairwise one: each distinct candidate is scored once; higher wins,
    a difference within `tol` is a tie."""

    def __init__(self, judge: Any, criterion: str | None = None, tol: float = 0.0) -> None:
        self.judge, self.criterion, self.tol = judge, criterion, tol
        self.name = judge.name

    def compare(self, items: list[Pair]) -> list[Judgment]:
        keys: dict[tuple[str, str], int] = {}
        singles: list[tuple[Prompt, Candidate]] = []
        for p, a, b in items:
            for c in (a, b):
                if (p.id, c.id) not in keys:
                    keys[(p.id, c.id)] = len(singles)
                    singles.append((p, c))
        scored = safe_call(self.judge, "score", singles)
        out = []
        for p, a, b in items:
            ja, jb = scored[keys[(p.id, a.id)]], scored[keys[(p.id, b.id)]]
            sa, sb = main_score(ja, self.criterion), main_score(jb, self.criterion)
            j = Judgment(prompt_id=p.id, candidate_ids=[a.id, b.id], judge=self.name,
                         raw=json.dumps({"first": asdict(ja), "second": asdict(jb)}, default=str))
            if sa is None or sb is None:
                j.status = _failed_status([x for x in (ja, jb) if x.status != "ok"] or [ja])
                j.reason = "; ".join(x.reason for x in (ja, jb) if x.reason) or "no usable score"
            else:
                j.scores = {"first": sa, "second": sb}
                j.preference = "first" if sa - sb > self.tol else "second" if sb - sa > self.tol else "tie"
            out.append(j)
        return out


def as_pairwise(judge: Any) -> Any:
    return judge if is_pairwise(judge) else PairwiseFromPointwise(judge)


def _member_verdicts(members: list[Any], items: list[Pair]) -> list[list[Judgment]]:
    """Per item, the list of member judgments (members in order)."""
    per_member = [safe_call(as_pairwise(m), "compare", items) for m in members]
    return [list(row) for row in zip(*per_member, strict=True)] if items else []


def majority(verdicts: list[str], ties: str = "abstain") -> str:
    """Majority of valid verdicts ("first"/"second"/"tie").

    ties="abstain": a tie verdict is no vote; the side with more votes wins, equal counts give "tie".
    ties="vote": "tie" is a third option; the plurality wins, and a shared top count gives "tie"."""
    n_first, n_second = verdicts.count("first"), verdicts.count("second")
    if ties == "abstain":
        return "first" if n_first > n_second else "second" if n_second > n_first else "tie"
    if ties != "vote":
        raise ValueError(f"ties must be 'abstain' or 'vote', not {ties!r}")
    counts = {"first": n_first, "second": n_second, "tie": verdicts.count("tie")}
    top = max(counts.values())
    winners = [k for k, v in counts.items() if v == top]
    return winners[0] if len(winners) == 1 else "tie"


class MeanEnsemble:
    """Pointwise: per criterion, the mean (or median) over members with a valid score for it.

    `normalize=True` first z-scores each member's scores over the items of the call (for members on
    different scales). The members' spread (population std) per criterion is kept in `raw`."""

    def __init__(self, members: list[Any], reduce: str = "mean", name: str | None = None,
                 normalize: bool = False) -> None:
        if reduce not in ("mean", "median"):
            raise ValueError(f"reduce must be 'mean' or 'median', not {reduce!r}")
        self.members, self.reduce, self.normalize = members, reduce, normalize
        self.name = name or f"{reduce}({','.join(m.name for m in members)})"

    def score(self, items: list[tuple[Prompt, Candidate]]) -> list[Judgment]:
        per_member = [safe_call(m, "score", items) for m in self.members]
        stats: list[dict[str, tuple[float, float]]] = []
        for js in per_member:
            st = {}
            if self.normalize:
                crits = {k for j in js if j.status == "ok" for k in j.scores}
                for k in crits:
                    vals = [j.scores[k] for j in js if j.status == "ok" and k in j.scores]
                    sd = statistics.pstdev(vals) if len(vals) > 1 else 0.0
                    st[k] = (statistics.fmean(vals), sd if sd > 0 else 1.0)
            stats.append(st)
        out = []
        for i, (p, c) in enumerate(items):
            members = [js[i] for js in per_member]
            values: dict[str, list[float]] = {}
            for j, st in zip(members, stats, strict=True):
                if j.status != "ok":
                    continue
                for k, v in j.scores.items():
                    if v is not None and math.isfinite(v):
                        mu, sd = st.get(k, (0.0, 1.0))
                        values.setdefault(k, []).append((v - mu) / sd)
            agg = statistics.fmean if self.reduce == "mean" else statistics.median
            spread = {k: statistics.pstdev(v) for k, v in values.items()}
            j = Judgment(prompt_id=p.id, candidate_ids=[c.id], judge=self.name, raw=_dump(members, spread=spread))
            if values:
                j.scores = {k: float(agg(v)) for k, v in values.items()}
                j.rationale = f"{sum(m.status == 'ok' for m in members)}/{len(members)} members valid"
            else:
                j.status, j.reason = _failed_status(members), "no member gave a valid score"
            out.append(j)
        return out


class VoteEnsemble:
    """Pairwise: majority vote of members (pointwise members compare their two scores)."""

    def __init__(self, members: list[Any], ties: str = "abstain", name: str | None = None) -> None:
        majority([], ties)  # validate
        self.members, self.ties = members, ties
        self.name = name or f"vote({','.join(m.name for m in members)})"

    def compare(self, items: list[Pair]) -> list[Judgment]:
        out = []
        for (p, a, b), members in zip(items, _member_verdicts(self.members, items), strict=True):
            valid = [m.preference for m in members if m.status == "ok" and m.preference]
            j = Judgment(prompt_id=p.id, candidate_ids=[a.id, b.id], judge=self.name, raw=_dump(members))
            if not valid:
                j.status, j.reason = _failed_status(members), "no member gave a valid verdict"
            else:
                j.preference = majority(valid, self.ties)
                j.scores = {"p_first": (valid.count("first") + 0.5 * valid.count("tie")) / len(valid),
                            "agreement": valid.count(j.preference) / len(valid)}
                j.rationale = (f"votes first={valid.count('first')} second={valid.count('second')} "
                               f"tie={valid.count('tie')} invalid={len(members) - len(valid)}")
            out.append(j)
        return out


class MetaJudge:
    """Pairwise: the members' common verdict when all valid members agree; otherwise (disagreement, or
    no valid member) the arbiter decides. The arbiter is called once, on the disputed items only."""

    def __init__(self, members: list[Any], arbiter: Any, name: str | None = None) -> None:
        self.members, self.arbiter = members, as_pairwise(arbiter)
        self.name = name or f"meta({','.join(m.name for m in members)};{arbiter.name})"
        self.last_escalated = 0

    def compare(self, items: list[Pair]) -> list[Judgment]:
        rows = _member_verdicts(self.members, items)
        disputed = [i for i, ms in enumerate(rows)
                    if len({m.preference for m in ms if m.status == "ok" and m.preference}) != 1]
        verdicts = dict(zip(disputed, safe_call(self.arbiter, "compare", [items[i] for i in disputed]), strict=True))
        self.last_escalated = len(disputed)
        out = []
        for i, ((p, a, b), members) in enumerate(zip(items, rows, strict=True)):
            arb = verdicts.get(i)
            j = Judgment(prompt_id=p.id, candidate_ids=[a.id, b.id], judge=self.name,
                         raw=_dump(members, arbiter=None if arb is None else asdict(arb), escalated=arb is not None))
            if arb is None:
                j.preference = next(m.preference for m in members if m.status == "ok" and m.preference)
                j.rationale = "members agree"
            elif arb.status == "ok" and arb.preference:
                j.preference, j.scores, j.rationale = arb.preference, dict(arb.scores), "members disagree: arbiter"
            else:
                j.status, j.reason = arb.status if arb.status != "ok" else "invalid", f"arbiter: {arb.reason}"
            out.append(j)
        return out


# ---------------------------------------------------------------- weighted combination


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def fit_logistic(X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None, l2: float = 1e-3,
                 fit_intercept: bool = False, max_iter: int = 100, tol: float = 1e-10) -> np.ndarray:
    """L2-regularised logistic regression by Newton's method (IRLS), float64. `y` may be soft (in [0,1]).

    Minimises `sum_i s_i * logloss(y_i, sigmoid(x_i . w)) / sum_i s_i + l2 * |w|^2` (the intercept, last
    entry when fitted, is not penalised). Returns w."""
    X = np.asarray(X, dtype=np.float64)
    if fit_intercept:
        X = np.hstack([X, np.ones((X.shape[0], 1))])
    y = np.asarray(y, dtype=np.float64)
    s = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    s = s / s.sum()
    penalty = np.full(X.shape[1], 2.0 * l2)
    if fit_intercept:
        penalty[-1] = 0.0
    w = np.zeros(X.shape[1])
    for _ in range(max_iter):
        p = sigmoid(X @ w)
        grad = X.T @ (s * (p - y)) + penalty * w
        hess = (X * (s * p * (1 - p))[:, None]).T @ X + np.diag(penalty) + 1e-12 * np.eye(X.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < tol:
            break
    return w


class WeightedEnsemble:
    """Pairwise: `P(first > second) = sigmoid(sum_k w_k * d_k / scale_k)`; call `fit(pairs)` first (or pass
    `weights`). A member's invalid output contributes d_k = 0 (no evidence)."""

    def __init__(self, members: list[Any], weights: list[float] | None = None, l2: float = 1e-3,
                 name: str | None = None) -> None:
        self.members, self.l2 = members, l2
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        self.scale = np.ones(len(members))
        self.name = name or f"weighted({','.join(m.name for m in members)})"

    def features(self, items: list[Pair]) -> tuple[np.ndarray, list[list[Judgment]]]:
        rows = _member_verdicts(self.members, items)
        X = np.zeros((len(items), len(self.members)))
        for i, members in enumerate(rows):
            for k, (m, j) in enumerate(zip(self.members, members, strict=True)):
                if j.status != "ok" or not j.preference:
                    continue
                if is_pairwise(m):
                    X[i, k] = {"first": 1.0, "second": -1.0}.get(j.preference, 0.0)
                else:
                    X[i, k] = j.scores["first"] - j.scores["second"]
        return X, rows

    def fit(self, pairs: list[Pair]) -> np.ndarray:
        """Fit the weights on human-labelled `(prompt, chosen, rejected)`: chosen is the first candidate.

        Members are asked in both orders, (chosen, rejected) with label 1 and (rejected, chosen) with label
        0. Mirroring the first order's features instead would assume every member is position-consistent:
        a judge that always answers "A" would look perfectly accurate and get a large weight."""
        pairs = list(pairs)
        X_fwd, _ = self.features(pairs)
        X_bwd, _ = self.features([(p, b, a) for p, a, b in pairs])
        X = np.vstack([X_fwd, X_bwd])
        rms = np.sqrt((X**2).mean(0)) if len(X) else np.ones(X.shape[1])
        self.scale = np.where(rms > 0, rms, 1.0)
        y = np.r_[np.ones(len(X_fwd)), np.zeros(len(X_bwd))]
        self.weights = fit_logistic(X / self.scale, y, l2=self.l2)
        return self.weights

    @property
    def raw_weights(self) -> dict[str, float]:
        """Weights per member, on each member's own score scale."""
        if self.weights is None:
            raise RuntimeError("WeightedEnsemble has no weights: call fit(pairs) or pass weights")
        return {m.name: float(w / s) for m, w, s in zip(self.members, self.weights, self.scale, strict=True)}

    def compare(self, items: list[Pair]) -> list[Judgment]:
        if self.weights is None:
            raise RuntimeError("WeightedEnsemble has no weights: call fit(pairs) or pass weights")
        X, rows = self.features(items)
        probs = sigmoid((X / self.scale) @ self.weights)
        out = []
        for (p, a, b), members, x, prob in zip(items, rows, X, probs, strict=True):
            j = Judgment(prompt_id=p.id, candidate_ids=[a.id, b.id], judge=self.name,
                         raw=_dump(members, features=x.tolist()))
            if all(m.status != "ok" for m in members):
                j.status, j.reason = _failed_status(members), "no member gave a valid verdict"
            else:
                j.scores = {"p_first": float(prob)}
                j.preference = "first" if prob > 0.5 else "second" if prob < 0.5 else "tie"
            out.append(j)
        return out
