"""Length control for preferences and win rates (methods.md 4.6, AlpacaEval LC) and length-bias measures.

A preference `p_i` in [0, 1] is how much the judge prefers the *first* response of pair i (1 = first,
0 = second, 0.5 = tie). AlpacaEval's GLM, without the per-model terms:

    logit P(first > second | i) = theta_len * tanh(delta_i / std(delta)) + theta_cov . c_i + theta_0,
    delta_i = len(first_i) - len(second_i)   (characters; AlpacaEval writes baseline - model, so its
                                              theta_len has the opposite sign)

fitted by logistic regression on soft labels (row weight p for y=1 and 1-p for y=0, which is the same as
a soft target p). The length-controlled preference is the model's prediction with the length term set to
zero, averaged over pairs: `mean_i sigmoid(theta_cov . c_i + theta_0)` (= sigmoid(theta_0) without
covariates `c`, such as AlpacaEval's instruction difficulty). AlpacaEval fits with L1 and cross-validation;
here a small L2 penalty on theta_len (never on theta_0) keeps the fit finite when a judge always picks the
longer response.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from alignpipe.evaluation.ensemble import fit_logistic, sigmoid


def preference_value(preference: str | None, status: str = "ok") -> float:
    """first -> 1, second -> 0, tie or anything unusable -> 0.5 (RewardBench counts unparseable as 0.5)."""
    if status != "ok":
        return 0.5
    return {"first": 1.0, "second": 0.0}.get(preference or "", 0.5)


def length_controlled(prefs: Sequence[float], len_first: Sequence[float], len_second: Sequence[float],
                      covariates: np.ndarray | None = None, l2: float = 1e-3) -> dict[str, float]:
    """Raw and length-controlled mean preference for the first response.

    Returns `raw` (mean p), `lc` (prediction at zero length difference), `theta_len` (> 0: the judge
    favours the longer first response), `theta_0`, `std_delta_len` and `n`."""
    p = np.clip(np.asarray(prefs, dtype=np.float64), 0.0, 1.0)
    n = len(p)
    if n == 0:
        return {"raw": math.nan, "lc": math.nan, "theta_len": math.nan, "theta_0": math.nan,
                "std_delta_len": math.nan, "n": 0}
    delta = np.asarray(len_first, dtype=np.float64) - np.asarray(len_second, dtype=np.float64)
    sd = float(delta.std(ddof=1)) if n > 1 else 0.0
    x = np.tanh(delta / sd) if sd > 0 else np.zeros(n)
    cov = np.zeros((n, 0)) if covariates is None else np.asarray(covariates, dtype=np.float64).reshape(n, -1)
    X = np.hstack([x[:, None], cov])
    w = fit_logistic(X, p, l2=l2, fit_intercept=True)
    theta_len, theta_cov, theta_0 = w[0], w[1:-1], w[-1]
    lc = float(np.mean(sigmoid(cov @ theta_cov + theta_0)))
    return {"raw": float(p.mean()), "lc": lc, "theta_len": float(theta_len), "theta_0": float(theta_0),
            "std_delta_len": sd, "n": n}


def length_controlled_winrate(prefs: Sequence[float], len_model: Sequence[float], len_baseline: Sequence[float],
                              covariates: np.ndarray | None = None) -> dict[str, float]:
    """AlpacaEval naming: the model's win rate against a baseline, raw and length-controlled, in percent."""
    r = length_controlled(prefs, len_model, len_baseline, covariates)
    return {**r, "win_rate": 100 * r["raw"], "lc_win_rate": 100 * r["lc"]}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def length_bias(prefs: Sequence[float], len_first: Sequence[float], len_second: Sequence[float]) -> dict[str, float]:
    """How verdicts follow length.

    - `corr`: Pearson correlation between the signed verdict `2p - 1` (+1 first, -1 second, 0 tie) and
      the length difference `len(first) - len(second)`; with decisive verdicts only, this is the
      point-biserial correlation. NaN when either side is constant.
    - `longer_rate`: among decisive verdicts on pairs of unequal length, the share that picked the longer
      response (0.5 = no length preference). `n_decisive` counts those pairs."""
    v = 2.0 * np.asarray(prefs, dtype=np.float64) - 1.0
    d = np.asarray(len_first, dtype=np.float64) - np.asarray(len_second, dtype=np.float64)
    decisive = (v != 0) & (d != 0)
    longer = float(np.mean(np.sign(v[decisive]) == np.sign(d[decisive]))) if decisive.any() else math.nan
    return {"corr": _pearson(v, d), "longer_rate": longer, "n_decisive": int(decisive.sum())}
