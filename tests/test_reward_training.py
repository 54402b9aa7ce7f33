"""`alignpipe train-reward-model`: both methods on the tiny model from hh-rlhf and TRL pair files, the saved
directory used as the `reward-model:DIR` judge, the seeded split, and the CLI's errors."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from alignpipe import AlignpipeError
from alignpipe.data.pairs import load_pairs
from alignpipe.evaluation.judge_registry import JudgeRegistry
from alignpipe.evaluation.reward_model import RewardModelJudge, format_conversation, pair_accuracy
from alignpipe.evaluation.reward_training import parse_layers, train_reward_model_command

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n: int, fmt: str, seed: int = 1) -> list[dict]:
    """Easily separable pairs: the chosen answer is polite ("thanks ... happy to help"), the rejected one curt
    ("no."); random digits make every text distinct."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        d = "".join(rng.choice("0123456789") for _ in range(4))
        question, good, bad = f"what is {d}?", f"thanks, it is {d}, happy to help", f"no. {d[::-1]}"
        if fmt == "hh":
            rows.append({"chosen": f"\n\nHuman: {question}\n\nAssistant: {good}",
                         "rejected": f"\n\nHuman: {question}\n\nAssistant: {bad}"})
        else:
            rows.append({"id": f"q{i}", "prompt": [{"role": "user", "content": question}],
                         "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _judge_scores(out: Path, pairs: list) -> tuple[list, torch.Tensor]:
    judge = JudgeRegistry().resolve(f"reward-model:{out}")
    items = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    judgments = judge.score(items)
    return judgments, torch.tensor([j.scores.get("reward", math.nan) for j in judgments])


def test_head_method_from_hh_pairs(tiny_model_path: Path, tmp_path: Path) -> None:
    pairs_file = _write(tmp_path / "hh.jsonl", _rows(40, "hh"))
    out = tmp_path / "rm-head"
    m = train_reward_model_command(pairs_file, out, backbone=tiny_model_path, method="head", train_fraction=0.6,
                                   seed=0, max_length=64, show=False)
    assert m["method"] == "head" and m["pairs"] == 40 and m["train_pairs"] == 24 and m["test_pairs"] == 16
    assert m["layers"] == 2 and m["objective_start"] == pytest.approx(math.log(2))
    assert m["train_accuracy"] > 0.9 and m["test_accuracy"] > 0.8 and m["train_loss"] < 0.5 * math.log(2)
    assert m["total_seconds"] > 0 and json.loads((out / "metrics.json").read_text()) == m

    # the directory is a judge; its rewards reproduce the recorded test accuracy
    split = json.loads((out / "split.json").read_text())
    by_id = {p.prompt.id: p for p in load_pairs(pairs_file)}
    test = [by_id[i] for i in split["test"]]
    judgments, scores = _judge_scores(out, test)
    assert all(j.status == "ok" for j in judgments) and torch.isfinite(scores).all()
    assert pair_accuracy(scores[:16], scores[16:]) == pytest.approx(m["test_accuracy"])


def test_lora_method_from_trl_pairs_saves_a_merged_classifier(tiny_model_path: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    pairs_file = _write(tmp_path / "trl.jsonl", _rows(24, "trl"))
    out = tmp_path / "rm-lora"
    m = train_reward_model_command(pairs_file, out, backbone=tiny_model_path, method="lora", train_fraction=0.5,
                                   seed=0, max_length=64, batch_size=4, epochs=3, lr=1e-3, show=False)
    assert m["method"] == "lora" and m["train_pairs"] == 12 and m["test_pairs"] == 12 and m["steps"] == 9
    # zero-initialized head: the first step sees every pair tied; training lowers the loss
    assert m["objective_start"] == pytest.approx(math.log(2), abs=1e-6)
    assert m["train_loss"] < 0.5 * math.log(2) and m["train_accuracy"] > 0.9
    assert m["test_loss"] < 0.5 * math.log(2) and m["test_accuracy"] > 0.8

    # merged: a plain sequence classifier with no peft leftovers, and rewards equal to the trained model's
    plain = AutoModelForSequenceClassification.from_pretrained(out)
    assert not any("lora" in name for name, _ in plain.named_parameters())
    assert not (out / "adapter_config.json").exists()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(plain.state_dict()[q], base.state_dict()[q])  # the adapter was merged in
    train_ids = json.loads((out / "split.json").read_text())["train"]
    by_id = {p.prompt.id: p for p in load_pairs(pairs_file)}
    train = [by_id[i] for i in train_ids]
    judgments, scores = _judge_scores(out, train)
    assert all(j.status == "ok" for j in judgments) and torch.isfinite(scores).all()
    assert pair_accuracy(scores[:12], scores[12:]) == pytest.approx(m["train_accuracy"])
    judge = RewardModelJudge(out)
    texts = [format_conversation(judge.tokenizer, p, c.completion) for p, c, _ in train[:1]]
    enc = judge.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        assert float(plain(**enc).logits[0, 0]) == pytest.approx(float(scores[0]), abs=1e-4)


def test_split_is_seeded_and_disjoint(tiny_model_path: Path, tmp_path: Path) -> None:
    pairs_file = _write(tmp_path / "trl.jsonl", _rows(20, "trl"))

    def split(seed: int, name: str) -> dict:
        train_reward_model_command(pairs_file, tmp_path / name, backbone=tiny_model_path, seed=seed, max_length=32,
                                   train_fraction=0.6, show=False)
        return json.loads((tmp_path / name / "split.json").read_text())

    a, b, c = split(3, "a"), split(3, "b"), split(4, "c")
    assert len(a["train"]) == 12 and len(a["test"]) == 8
    assert not set(a["train"]) & set(a["test"]) and sorted(a["train"] + a["test"]) == sorted(f"q{i}" for i in range(20))
    assert (a["train"], a["test"]) == (b["train"], b["test"]) and a["train"] != c["train"]


def test_bad_inputs_are_one_line_errors(tiny_model_path: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(AlignpipeError, match=f"pairs file not found: {missing}"):
        train_reward_model_command(missing, tmp_path / "o", backbone=tiny_model_path)
    rows = _rows(4, "trl")
    del rows[2]["rejected"]
    bad = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(AlignpipeError, match=r"bad.jsonl: row 3: field 'rejected': missing field"):
        train_reward_model_command(bad, tmp_path / "o", backbone=tiny_model_path)
    good = _write(tmp_path / "good.jsonl", _rows(4, "trl"))
    with pytest.raises(AlignpipeError, match="--method must be one of head, lora"):
        train_reward_model_command(good, tmp_path / "o", backbone=tiny_model_path, method="full")
    with pytest.raises(AlignpipeError, match="between 1 and 2"):
        train_reward_model_command(good, tmp_path / "o", backbone=tiny_model_path, layers="1,3")
    assert parse_layers("all", 30) is None and parse_layers("15,6,9", 30) == [6, 9, 15]


def test_cli_trains_and_reports_a_missing_file_in_one_line(tiny_model_path: Path, tmp_path: Path, monkeypatch,
                                                           capsys) -> None:
    from typer.testing import CliRunner

    from alignpipe import cli

    pairs_file = _write(tmp_path / "hh.jsonl", _rows(10, "hh"))
    out = tmp_path / "rm"
    result = CliRunner().invoke(cli.app, ["train-reward-model", "--pairs", str(pairs_file), "--output", str(out),
                                          "--backbone", str(tiny_model_path), "--max-length", "48", "--no-cache"])
    assert result.exit_code == 0, result.output
    assert "train" in result.output and "test" in result.output and f"reward-model:{out}" in result.output
    assert json.loads((out / "metrics.json").read_text())["pairs"] == 10

    missing = tmp_path / "missing.jsonl"
    result = CliRunner().invoke(cli.app, ["train-reward-model", "--pairs", str(missing), "--output", str(out)])
    assert isinstance(result.exception, AlignpipeError) and str(missing) in str(result.exception)
    monkeypatch.setattr("sys.argv", ["alignpipe", "train-reward-model", "--pairs", str(missing), "--output", str(out)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: pairs file not found: {missing}"
