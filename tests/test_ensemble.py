"""Judge ensembles: hand-computed mean/median, majority votes with ties, the meta-judge's escalation,
and the weighted combination recovering a known weighting."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from alignpipe.evaluation.ensemble import (
    MeanEnsemble,
    MetaJudge,
    PairwiseFromPointwise,
    VoteEnsemble,
    WeightedEnsemble,
    fit_logistic,
    majority,
    sigmoid,
)
from alignpipe.records import Candidate, Judgment, Prompt

P = Prompt(id="p", prompt="q")
A, B, C = (Candidate(prompt_id="p", id=x, completion=x) for x in ("a", "b", "c"))


class FixedScores:
    """Pointwise fake: scores per candidate id; None means an invalid answer."""

    def __init__(self, name: str, table: dict[str, dict[str, float] | None]) -> None:
        self.name, self.table, self.calls = name, table, 0

    def score(self, items: list) -> list[Judgment]:
        self.calls += 1
        out = []
        for p, c in items:
            s = self.table[c.id]
            out.append(Judgment(prompt_id=p.id, candidate_ids=[c.id], judge=self.name, scores=s or {},
                                status="ok" if s is not None else "invalid", reason="" if s else "unparseable"))
        return out


class FixedVerdicts:
    """Pairwise fake: verdict per (first id, second id); None means invalid."""

    def __init__(self, name: str, table: dict[tuple[str, str], str | None]) -> None:
        self.name, self.table, self.seen = name, table, []

    def compare(self, items: list) -> list[Judgment]:
        self.seen.append([(a.id, b.id) for _, a, b in items])
        out = []
        for p, a, b in items:
            v = self.table[(a.id, b.id)]
            out.append(Judgment(prompt_id=p.id, candidate_ids=[a.id, b.id], judge=self.name, preference=v,
                                status="ok" if v else "invalid"))
        return out


class Crashing:
    name = "crash"

    def score(self, items: list) -> list[Judgment]:
        raise RuntimeError("backend down")


def test_mean_and_median_per_criterion() -> None:
    j1 = FixedScores("j1", {"a": {"help": 1.0, "safe": 4.0}, "b": {"help": 2.0}})
    j2 = FixedScores("j2", {"a": {"help": 2.0, "safe": 2.0}, "b": None})
    j3 = FixedScores("j3", {"a": {"help": 9.0}, "b": {"help": 4.0}})
    mean = MeanEnsemble([j1, j2, j3]).score([(P, A), (P, B)])
    assert mean[0].scores == {"help": pytest.approx(4.0), "safe": pytest.approx(3.0)}
    assert mean[1].scores == {"help": pytest.approx(3.0)}  # j2 invalid on b: left out, not counted as 0
    assert mean[1].rationale == "2/3 members valid"
    median = MeanEnsemble([j1, j2, j3], reduce="median").score([(P, A)])
    assert median[0].scores == {"help": 2.0, "safe": 3.0}
    raw = json.loads(mean[0].raw)
    assert [m["judge"] for m in raw["members"]] == ["j1", "j2", "j3"]
    assert raw["spread"]["safe"] == pytest.approx(1.0)


def test_mean_normalized_and_all_invalid_and_crash() -> None:
    j1 = FixedScores("j1", {"a": {"s": 1.0}, "b": {"s": 3.0}})
    j2 = FixedScores("j2", {"a": {"s": 100.0}, "b": {"s": 300.0}})
    out = MeanEnsemble([j1, j2], normalize=True).score([(P, A), (P, B)])
    assert out[0].scores["s"] == pytest.approx(-1.0) and out[1].scores["s"] == pytest.approx(1.0)
    bad = MeanEnsemble([FixedScores("x", {"a": None}), Crashing()]).score([(P, A)])
    assert bad[0].status == "invalid" and bad[0].scores == {}
    only_crash = MeanEnsemble([Crashing(), Crashing()]).score([(P, A)])
    assert only_crash[0].status == "error"
    assert json.loads(only_crash[0].raw)["members"][0]["reason"] == "RuntimeError: backend down"


@pytest.mark.parametrize("votes, abstain, vote", [
    (["first", "first", "second"], "first", "first"),
    (["first", "second"], "tie", "tie"),
    (["first", "tie", "tie"], "first", "tie"),
    (["first", "second", "tie"], "tie", "tie"),
    (["second", "second", "tie", "first"], "second", "second"),
    (["tie", "tie"], "tie", "tie"),
    ([], "tie", "tie"),
])
def test_majority_tie_rules(votes: list[str], abstain: str, vote: str) -> None:
    assert majority(votes, "abstain") == abstain and majority(votes, "vote") == vote
    with pytest.raises(ValueError):
        majority(votes, "coin")


def test_vote_mixes_pointwise_and_pairwise_members() -> None:
    point = FixedScores("rm", {"a": {"r": 2.0}, "b": {"r": 1.0}, "c": {"r": 2.0}})
    pair1 = FixedVerdicts("llm1", {("a", "b"): "second", ("a", "c"): "second"})
    pair2 = FixedVerdicts("llm2", {("a", "b"): "first", ("a", "c"): None})
    out = VoteEnsemble([point, pair1, pair2]).compare([(P, A, B), (P, A, C)])
    assert out[0].preference == "first" and out[0].scores == {"p_first": pytest.approx(2 / 3),
                                                               "agreement": pytest.approx(2 / 3)}
    # a vs c: rm ties (equal scores), llm1 says second, llm2 invalid -> abstain rule: second
    assert out[1].preference == "second" and "invalid=1" in out[1].rationale
    assert VoteEnsemble([point, pair1, pair2], ties="vote").compare([(P, A, C)])[0].preference == "tie"
    assert point.calls == 2  # each distinct candidate scored once per call: a, b, c in one batch
    members = json.loads(out[0].raw)["members"]
    assert [m["preference"] for m in members] == ["first", "second", "first"]


def test_pairwise_from_pointwise_tolerance() -> None:
    j = FixedScores("rm", {"a": {"r": 1.0}, "b": {"r": 1.05}, "c": None})
    assert PairwiseFromPointwise(j).compare([(P, A, B)])[0].preference == "second"
    assert PairwiseFromPointwise(j, tol=0.1).compare([(P, A, B)])[0].preference == "tie"
    assert PairwiseFromPointwise(j).compare([(P, A, C)])[0].status == "invalid"


def test_meta_judge_calls_arbiter_only_on_disagreement() -> None:
    m1 = FixedVerdicts("m1", {("a", "b"): "first", ("a", "c"): "first", ("b", "c"): None})
    m2 = FixedVerdicts("m2", {("a", "b"): "first", ("a", "c"): "second", ("b", "c"): None})
    arbiter = FixedVerdicts("arb", {("a", "c"): "second", ("b", "c"): "tie"})
    meta = MetaJudge([m1, m2], arbiter)
    out = meta.compare([(P, A, B), (P, A, C), (P, B, C)])
    assert [j.preference for j in out] == ["first", "second", "tie"]
    assert arbiter.seen == [[("a", "c"), ("b", "c")]] and meta.last_escalated == 2
    assert json.loads(out[0].raw)["escalated"] is False and json.loads(out[1].raw)["arbiter"]["judge"] == "arb"
    failing = MetaJudge([m1, m2], FixedVerdicts("arb", {("a", "c"): None}))
    assert failing.compare([(P, A, C)])[0].status == "invalid"


def test_fit_logistic_recovers_known_weights() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20000, 3))
    true = np.array([1.5, -0.7, 0.0])
    y = (rng.random(20000) < sigmoid(X @ true)).astype(float)
    w = fit_logistic(X, y, l2=0.0)
    assert np.allclose(w, true, atol=0.06)
    # soft labels = duplicated rows weighted p and 1 - p
    p = sigmoid(X[:500] @ true)
    soft = fit_logistic(X[:500], p, l2=1e-3, fit_intercept=True)
    dup = fit_logistic(np.vstack([X[:500], X[:500]]), np.r_[np.ones(500), np.zeros(500)],
                       sample_weight=np.r_[p, 1 - p], l2=1e-3, fit_intercept=True)
    assert np.allclose(soft, dup, atol=1e-8) and abs(soft[-1]) < 0.2


def test_weighted_ensemble_fits_a_known_weighting() -> None:
    # latent quality q; judge "good" sees q, judge "noise" is unrelated; humans prefer by q (BT with weight 2)
    rng = np.random.default_rng(1)
    n = 3000
    q1, q2 = rng.normal(size=n), rng.normal(size=n)
    noise = rng.normal(size=(n, 2))
    pairs, table_good, table_noise = [], {}, {}
    for i in range(n):
        first_wins = rng.random() < sigmoid(2.0 * (q1[i] - q2[i]))
        ids = (f"x{i}", f"y{i}") if first_wins else (f"y{i}", f"x{i}")
        table_good.update({f"x{i}": {"s": q1[i]}, f"y{i}": {"s": q2[i]}})
        table_noise.update({f"x{i}": {"s": noise[i, 0]}, f"y{i}": {"s": noise[i, 1]}})
        prompt = Prompt(id=f"p{i}", prompt="q")
        pairs.append((prompt, *(Candidate(prompt_id=prompt.id, id=c, completion=c) for c in ids)))
    good, noisy = FixedScores("good", table_good), FixedScores("noise", table_noise)
    ens = WeightedEnsemble([good, noisy], l2=0.0)
    ens.fit(pairs)
    raw = ens.raw_weights
    assert raw["good"] == pytest.approx(2.0, abs=0.15) and abs(raw["noise"]) < 0.1
    p, a, b = pairs[0]
    fwd, bwd = ens.compare([(p, a, b)])[0], ens.compare([(p, b, a)])[0]
    assert fwd.scores["p_first"] + bwd.scores["p_first"] == pytest.approx(1.0)  # order-symmetric
    expected = sigmoid(raw["good"] * (table_good[a.id]["s"] - table_good[b.id]["s"])
                       + raw["noise"] * (table_noise[a.id]["s"] - table_noise[b.id]["s"]))
    assert fwd.scores["p_first"] == pytest.approx(float(expected))
    assert json.loads(fwd.raw)["features"][0] == pytest.approx(table_good[a.id]["s"] - table_good[b.id]["s"])


def test_weighted_ensemble_with_given_weights_and_pairwise_members() -> None:
    llm = FixedVerdicts("llm", {("a", "b"): "first", ("b", "a"): "tie"})
    ens = WeightedEnsemble([llm], weights=[math.log(3)])
    assert ens.compare([(P, A, B)])[0].scores["p_first"] == pytest.approx(0.75)
    out = ens.compare([(P, B, A)])[0]
    assert out.preference == "tie" and out.scores["p_first"] == 0.5
    with pytest.raises(RuntimeError, match="call fit"):
        WeightedEnsemble([llm]).compare([(P, A, B)])


def test_weighted_ensemble_gives_a_position_biased_member_no_weight() -> None:
    """A pairwise member that always answers "first" agrees with every human label when chosen is shown
    first; fitted on both orders it carries no information and must get (near) zero weight."""

    class AlwaysFirst:
        name = "always_first"

        def compare(self, items: list) -> list[Judgment]:
            return [Judgment(prompt_id=p.id, candidate_ids=[a.id, b.id], judge=self.name, preference="first")
                    for p, a, b in items]

    rng = np.random.default_rng(0)
    pairs, table = [], {}
    for i in range(400):
        q1, q2 = rng.normal(size=2)
        ids = (f"x{i}", f"y{i}") if rng.random() < sigmoid(q1 - q2) else (f"y{i}", f"x{i}")
        table.update({f"x{i}": {"s": q1}, f"y{i}": {"s": q2}})
        prompt = Prompt(id=f"p{i}", prompt="q")
        pairs.append((prompt, *(Candidate(prompt_id=prompt.id, id=c, completion=c) for c in ids)))
    ens = WeightedEnsemble([AlwaysFirst(), FixedScores("quality", table)], l2=1e-3)
    ens.fit(pairs)
    raw = ens.raw_weights
    assert abs(raw["always_first"]) < 1e-6 and raw["quality"] > 0.5
    p, a, b = pairs[0]
    assert ens.compare([(p, a, b)])[0].preference != ens.compare([(p, b, a)])[0].preference
