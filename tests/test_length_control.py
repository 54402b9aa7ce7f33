"""Length control (AlpacaEval GLM) on synthetic data with a known length effect, and length-bias measures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignpipe.evaluation.ensemble import sigmoid
from alignpipe.evaluation.length_control import (
    length_bias,
    length_controlled,
    length_controlled_winrate,
    preference_value,
)


def _lengths(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(50, 800, n).astype(float), rng.integers(50, 800, n).astype(float)


def test_recovers_a_known_length_effect() -> None:
    rng = np.random.default_rng(0)
    lf, ls = _lengths(40000, 1)
    delta = lf - ls
    theta_len, theta_0 = 1.5, 0.4
    p_true = sigmoid(theta_len * np.tanh(delta / delta.std(ddof=1)) + theta_0)
    wins = (rng.random(len(p_true)) < p_true).astype(float)
    r = length_controlled(wins, lf, ls, l2=0.0)
    assert r["theta_len"] == pytest.approx(theta_len, abs=0.06)
    assert r["theta_0"] == pytest.approx(theta_0, abs=0.04)
    assert r["lc"] == pytest.approx(sigmoid(np.array(theta_0)), abs=0.01)
    assert r["raw"] == pytest.approx(wins.mean())
    # soft preferences give the same fit as their expectation
    soft = length_controlled(p_true, lf, ls, l2=0.0)
    assert soft["theta_len"] == pytest.approx(theta_len, abs=1e-6) and soft["theta_0"] == pytest.approx(theta_0, abs=1e-6)


def test_a_pure_length_judge_is_controlled_to_chance() -> None:
    lf, ls = _lengths(5000, 2)
    lf[:3000] += 300  # the first response is longer more often: raw preference far from 0.5
    prefs = (lf > ls).astype(float) + 0.5 * (lf == ls)
    r = length_controlled(prefs, lf, ls)
    assert r["raw"] > 0.65 and r["theta_len"] > 3
    assert r["lc"] == pytest.approx(0.5, abs=0.05)


def test_no_length_dependence_leaves_the_rate_unchanged() -> None:
    lf, ls = _lengths(20000, 3)
    rng = np.random.default_rng(4)
    wins = (rng.random(20000) < 0.65).astype(float)
    r = length_controlled(wins, lf, ls)
    assert abs(r["theta_len"]) < 0.06 and r["lc"] == pytest.approx(r["raw"], abs=0.01)


def test_equal_lengths_and_empty_input() -> None:
    r = length_controlled([1.0, 0.0, 1.0, 0.5], [10, 10, 10, 10], [10, 10, 10, 10])
    assert r["theta_len"] == 0.0 and r["lc"] == pytest.approx(0.625, abs=1e-6) and r["std_delta_len"] == 0.0
    assert math.isnan(length_controlled([], [], [])["lc"])


def test_covariates_and_winrate_percent() -> None:
    lf, ls = _lengths(4, 5)
    r = length_controlled_winrate([1, 0, 1, 1], lf, ls, covariates=np.zeros((4, 1)))
    assert r["win_rate"] == 75.0 and r["lc_win_rate"] == pytest.approx(100 * r["lc"])


def test_preference_value() -> None:
    assert [preference_value(v) for v in ("first", "second", "tie", None)] == [1.0, 0.0, 0.5, 0.5]
    assert preference_value("first", status="invalid") == 0.5


def test_length_bias_by_hand() -> None:
    # pairs: (first, second) lengths and verdicts
    lf, ls = [10, 30, 5, 7, 8], [20, 10, 5, 3, 9]
    prefs = [0.0, 1.0, 1.0, 0.0, 0.5]  # longer, longer, (equal length), shorter, tie
    r = length_bias(prefs, lf, ls)
    assert r["n_decisive"] == 3 and r["longer_rate"] == pytest.approx(2 / 3)
    v, d = np.array([-1, 1, 1, -1, 0.0]), np.array([-10, 20, 0, 4, -1.0])
    assert r["corr"] == pytest.approx(np.corrcoef(v, d)[0, 1])
    assert math.isnan(length_bias([1.0, 1.0], [1, 2], [2, 1])["corr"])  # constant verdict
    assert math.isnan(length_bias([0.5], [1], [2])["longer_rate"])
