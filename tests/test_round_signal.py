"""The round's signal figures (optimization/round_signal.py) on hand-made log-probs with known answers."""

import pytest
import torch

from alignpipe.optimization.round_signal import implicit_reward_signal, labelled, objective_beta


def t(*values):
    return torch.tensor(values)


def test_pair_accuracy_margin_and_log_ratio():
    # rows: chosen, rejected per pair; completion log-ratio to the reference per row: +1, -1 | 0, 0 | -0.5, +0.5
    policy = [t(-1.0, -1.0), t(-2.0, -2.0), t(-0.5), t(-0.7), t(-1.5), t(-0.5)]
    ref = [t(-2.0, -1.0), t(-1.5, -1.5), t(-0.5), t(-0.7), t(-1.0), t(-1.0)]
    out = implicit_reward_signal("pair", policy, ref, beta=0.1)
    # rewards beta * ratio: pair 1 right (0.1 > -0.1), pair 2 a tie (half), pair 3 wrong (-0.05 < 0.05)
    assert out["reward_acc"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert out["reward_margin"] == pytest.approx((0.2 + 0.0 - 0.1) / 3)
    assert out["kl_ref"] == pytest.approx((1 - 1 + 0 + 0 - 0.5 + 0.5) / 6)


def test_policy_equal_to_reference_is_half_accuracy_zero_margin():
    rows = [t(-1.0, -2.0), t(-3.0)]
    out = implicit_reward_signal("pair", rows, [r.clone() for r in rows], beta=0.5)
    assert out == {"kl_ref": 0.0, "reward_acc": 0.5, "reward_margin": 0.0}


def test_points_skip_the_mismatched_rows_and_groups_have_no_accuracy():
    policy = [t(-1.0), t(-9.0), t(-2.0), t(-9.0)]  # every second row: KTO's mismatched completion
    ref = [t(-2.0), t(0.0), t(-2.5), t(0.0)]
    assert implicit_reward_signal("point", policy, ref, beta=0.1) == {"kl_ref": pytest.approx((1.0 + 0.5) / 2)}
    group = implicit_reward_signal("group", [t(-1.0), t(-2.0), t(-3.0)], [t(-1.0), t(-1.0), t(-1.0)], beta=0.1)
    assert group == {"kl_ref": pytest.approx(-1.0)}


def test_beta_is_the_first_objectives_and_labels_say_when():
    assert objective_beta([("sft", 1.0, {}), ("dpo", 1.0, {"beta": 0.3}), ("ipo", 1.0, {"beta": 0.9})]) == 0.3
    assert objective_beta([("sft", 1.0, {})]) == 0.1
    assert labelled({"reward_acc": 0.5}, "after") == {"reward_acc_after": 0.5}
