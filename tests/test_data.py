import json

import pytest

from alignpipe import AlignpipeError
from alignpipe.config import ArithmeticTask, FileTask, Gsm8kTask
from alignpipe.data import load_task
from alignpipe.data.files import read_rows


def test_arithmetic_answers_exact_and_pools_disjoint():
    task = ArithmeticTask(ops=["+", "-", "*"])
    data = load_task(task, 300)
    train_ids = {p.id for p in data.train}
    held_exprs = {p.meta["expression"] for p in data.heldout}
    assert not held_exprs & {p.meta["expression"] for p in data.train}
    assert len(data.heldout) == 300 and len(train_ids) == len(data.train)
    share = {op: sum(p.meta["op"] == op for p in data.train) / len(data.train) for op in "+-*"}
    assert all(abs(v - 1 / 3) < 0.02 for v in share.values()), share
    for p in data.heldout[:50] + data.train[:50]:
        a, op, b = p.meta["expression"].split()
        assert int(p.reference) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert p.prompt.endswith("Give only the final number.")
    assert {p.meta["op"] for p in data.heldout} == {"+", "-", "*"}


def test_arithmetic_is_seeded():
    a = load_task(ArithmeticTask(seed=3), 20)
    b = load_task(ArithmeticTask(seed=3), 20)
    c = load_task(ArithmeticTask(seed=4), 20)
    assert [p.id for p in a.heldout] == [p.id for p in b.heldout] != [p.id for p in c.heldout]


def test_large_operand_spaces_are_sampled_not_enumerated():
    """4-digit pairs are 81 million problems: sampled (seeded), split by hash, so the pools stay disjoint."""
    from alignpipe.data.arithmetic import MAX_ENUMERATED, pools

    task = ArithmeticTask(ops=["+"], digits=(4, 4))
    train, held = pools(task)["+"]
    assert len(train) + len(held) <= MAX_ENUMERATED and not set(train) & set(held)
    assert all(1000 <= x <= 9999 for combo in train[:100] + held[:100] for x in combo)
    assert pools(task)["+"] == (train, held)  # seeded: the same sample every time
    data = load_task(task, 50)
    assert not {p.meta["expression"] for p in data.heldout} & {p.meta["expression"] for p in data.train}
    # small spaces are still enumerated whole: 90 x 90 two-digit pairs
    small_train, small_held = pools(ArithmeticTask(ops=["+"]))["+"]
    assert len(small_train) + len(small_held) == 90 * 90


def test_arithmetic_digit_ranges_and_operands():
    data = load_task(ArithmeticTask(ops=["+"], operands=3, digits=(1, 1)), 10)
    for p in data.heldout:
        nums = p.meta["expression"].split(" + ")
        assert len(nums) == 3 and all(0 <= int(n) <= 9 for n in nums)


def test_gsm8k_loader_reads_final_answer(gsm8k_path):
    data = load_task(Gsm8kTask(path=str(gsm8k_path)), 50)
    assert len(data.heldout) == 50 and len(data.train) == 7473 - 50
    assert not {p.id for p in data.heldout} & {p.id for p in data.train}
    p = data.heldout[0]
    assert p.reference == p.meta["solution"].split("####")[-1].strip().replace(",", "")


def test_prompt_file_errors_name_file_and_row(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a", "answer": "1"}\n{not json\n')
    with pytest.raises(AlignpipeError, match=r"bad.jsonl: line 2: not valid JSON"):
        read_rows(bad_json)
    missing_field = tmp_path / "missing.jsonl"
    missing_field.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(AlignpipeError, match=r"missing.jsonl: row 2: missing or empty field 'prompt'"):
        load_task(FileTask(path=str(missing_field)), 1)
    with pytest.raises(AlignpipeError, match="prompts file not found"):
        read_rows(tmp_path / "nope.jsonl")
