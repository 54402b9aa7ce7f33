"""Bradley-Terry reward model: the loss against a float64 reference, the head fit, and a tiny-model RM
trained end to end, saved, reloaded by plain transformers and used as a judge."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from alignpipe.data.pairs import make_pair
from alignpipe.evaluation.reward_model import (
    META_FILE,
    RewardModelJudge,
    bt_loss,
    encode_features,
    fit_bt_head,
    format_conversation,
    load_sequence_classifier,
    pair_accuracy,
    split_pairs,
    train_reward_model,
)


def _reference_bt(rc: list[float], rr: list[float], margin: list[float], eta: float) -> float:
    terms = [math.log1p(math.exp(-(c - r - m))) for c, r, m in zip(rc, rr, margin, strict=True)]
    center = sum((c + r) ** 2 for c, r in zip(rc, rr, strict=True)) / len(rc)
    return sum(terms) / len(terms) + eta * center


def test_bt_loss_matches_float64_reference() -> None:
    rc, rr, m = [1.5, -0.3, 2.0, 0.0], [0.5, 0.7, -1.0, 0.0], [0.0, 0.5, 1.0, 0.25]
    for eta in (0.0, 0.01):
        got = bt_loss(torch.tensor(rc), torch.tensor(rr), torch.tensor(m), center_coef=eta)
        assert got.dtype == torch.float32
        assert float(got) == pytest.approx(_reference_bt(rc, rr, m, eta), rel=1e-6)
    assert float(bt_loss(torch.zeros(3), torch.zeros(3))) == pytest.approx(math.log(2))
    # large gaps stay finite (logsigmoid, not log(sigmoid))
    assert float(bt_loss(torch.tensor([-200.0]), torch.tensor([200.0]))) == pytest.approx(400.0)
    weighted = bt_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), weight=torch.tensor([3.0, 1.0]))
    assert float(weighted) == pytest.approx((3 * math.log1p(math.exp(-1)) + math.log(2)) / 4, rel=1e-6)


def test_pair_accuracy_counts_ties_half() -> None:
    assert pair_accuracy(torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([0.0, 1.0, 2.0, 0.0])) == 0.625


def test_fit_bt_head_learns_a_known_direction() -> None:
    g = torch.Generator().manual_seed(0)
    true_w = torch.randn(8, generator=g)
    fc, fr = torch.randn(400, 8, generator=g) * 3, torch.randn(400, 8, generator=g)
    swap = (fc @ true_w) < (fr @ true_w)  # make chosen the higher true reward
    fc[swap], fr[swap] = fr[swap].clone(), fc[swap].clone()
    fit = fit_bt_head(fc[:300], fr[:300], l2=1e-4)
    assert fit.losses[0] == pytest.approx(math.log(2)) and fit.losses[-1] < 0.2
    assert fit.train_accuracy > 0.97
    assert pair_accuracy(fc[300:] @ fit.weight, fr[300:] @ fit.weight) > 0.95
    cos = torch.nn.functional.cosine_similarity(fit.weight, true_w, dim=0)
    assert cos > 0.9
    # several candidate feature sets: the informative one is chosen on the inner holdout
    noise = torch.randn(400, 8, generator=g)
    stacked_c, stacked_r = torch.stack([noise, fc], 1), torch.stack([torch.randn(400, 8, generator=g), fr], 1)
    assert fit_bt_head(stacked_c[:300], stacked_r[:300]).layer_index == 1


def test_split_pairs_is_seeded_and_disjoint() -> None:
    items = list(range(100))
    train, test = split_pairs(items, 0.6, seed=3)
    assert len(train) == 60 and len(test) == 40 and sorted(train + test) == items
    assert split_pairs(items, 0.6, seed=3) == (train, test) and split_pairs(items, 0.6, seed=4) != (train, test)


def _pairs(n: int) -> list:
    # chosen answers are polite, rejected ones curt; random digits make every text distinct
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        d = "".join(str(int(x)) for x in torch.randint(0, 10, (4,), generator=g))
        out.append(make_pair(f"p{i}", [{"role": "user", "content": f"what is {d}?"}],
                             f"thanks, it is {d}, happy to help", f"no. {d[::-1]}"))
    return out


def test_tiny_reward_model_trains_saves_and_judges(tiny_model_path: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    pairs = _pairs(48)
    train, test = split_pairs(pairs, 0.5, seed=0)
    out = tmp_path / "rm"
    metrics = train_reward_model(tiny_model_path, train, out, test_pairs=test, max_length=64, layers=[1, 2],
                                 feature_cache=tmp_path / "cache")
    # loss falls from log 2 (the zero head scores every pair a tie: accuracy 0.5) and accuracy rises
    assert metrics["objective_start"] == pytest.approx(math.log(2))
    assert metrics["objective_end"] < 0.5 * math.log(2)
    assert metrics["train_accuracy"] > 0.9 and metrics["test_accuracy"] > 0.8
    assert (out / META_FILE).is_file() and metrics["layers"] in (1, 2)

    # a plain transformers load gives the same rewards as the judge, and they match the fitted head
    judge = RewardModelJudge(out, batch_size=3)
    plain = AutoModelForSequenceClassification.from_pretrained(out)
    assert plain.config.num_hidden_layers == metrics["layers"] == len(plain.model.layers)
    items = [(p, c) for p, c, _ in test] + [(p, r) for p, _, r in test]
    got = torch.tensor([j.scores["reward"] for j in judge.score(items)])
    assert all(j.status == "ok" and j.candidate_ids == [c.id] for j, (_, c) in zip(judge.score(items[:2]), items[:2],
                                                                                    strict=True))
    texts = [format_conversation(judge.tokenizer, p, c.completion) for p, c in items]
    enc = judge.tokenizer(texts[:1], add_special_tokens=False, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        assert float(plain(**enc).logits[0, 0]) == pytest.approx(float(got[0]), abs=1e-4)
    n = len(test)
    assert pair_accuracy(got[:n], got[n:]) == pytest.approx(metrics["test_accuracy"])
    # padding in a batch does not change a reward
    one_by_one = RewardModelJudge(out, batch_size=1).rewards(texts)
    assert torch.allclose(got, torch.tensor(one_by_one), atol=1e-4)
    # the cache answers a second run without a forward pass
    again = train_reward_model(tiny_model_path, train, None, test_pairs=test, max_length=64, layers=[1, 2],
                               feature_cache=tmp_path / "cache")
    assert again["test_accuracy"] == metrics["test_accuracy"]


def test_layer_features_equal_a_truncated_model(tiny_model_path: Path) -> None:
    full, tok = load_sequence_classifier(tiny_model_path)
    short, _ = load_sequence_classifier(tiny_model_path, num_hidden_layers=1)
    texts = ["<|im_start|>user\nhi<|im_end|>\n", "<|im_start|>user\na longer text here<|im_end|>\n"]
    both = encode_features(full, tok, texts, 64, 2, layer_counts=[1, 2])
    assert torch.allclose(both[:, 0], encode_features(short, tok, texts, 64, 2)[:, 0], atol=1e-5)
    assert torch.allclose(both[:, 1], encode_features(full, tok, texts, 64, 2)[:, 0], atol=1e-5)


def test_a_classifier_with_two_labels_is_refused(tiny_model_path: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from alignpipe import AlignpipeError

    AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=2).save_pretrained(tmp_path / "c")
    with pytest.raises(AlignpipeError, match="has 2 labels"):
        RewardModelJudge(tmp_path / "c")


def test_reward_model_judge_errors_are_per_item(tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    judge = RewardModelJudge(tiny_model_path)
    p, c, r = _pairs(1)[0]

    def boom(texts: list[str]) -> list[float]:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(judge, "rewards", boom)
    out = judge.score([(p, c), (p, r)])
    assert [j.status for j in out] == ["error", "error"] and "out of memory" in out[0].reason
