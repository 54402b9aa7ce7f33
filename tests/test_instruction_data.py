"""Instruction data (issue 13 item 1): Alpaca, ShareGPT, chat messages and TRL prompt/completion rows from jsonl,
json, parquet and `datasets` directories as chat prompts with gold responses; and whole conversations tokenised
with a mask on every assistant turn (exact masks on the tiny character-level tokenizer)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignpipe import AlignpipeError
from alignpipe.config import InstructionTask
from alignpipe.data.chat import format_messages
from alignpipe.data.instructions import detect_format, load, read_prompts
from alignpipe.models import load_tokenizer
from alignpipe.optimization.batching import encode
from alignpipe.optimization.conversation import encode_conversation
from alignpipe.synthesis.sources import gold_response

U, A, S = "user", "assistant", "system"


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def write_jsonl(path: Path, rows: list, blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- formats and sources


def test_alpaca_rows_with_input_system_and_history(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "And now?", "output": "bye", "system": "Be brief.", "history": [["hello", "hey"]]},
    ])
    p1, p2, p3 = read_prompts(path)
    assert (p1.id, p1.prompt, p1.task) == ("alpaca-1", "Add the numbers.\n\n2 and 3", "chat")
    assert p1.meta == {"messages": [turn(U, "Add the numbers.\n\n2 and 3")], "response": "5", "format": "alpaca",
                       "row": 1}
    assert p2.meta["messages"] == [turn(U, "Say hi.")] and p2.meta["response"] == "hi"
    assert p3.meta["messages"] == [turn(S, "Be brief."), turn(U, "hello"), turn(A, "hey"), turn(U, "And now?")]
    assert p3.prompt == "And now?" and gold_response(p3) == "bye"


def test_alpaca_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"},
                                {"instruction": "c", "input": "d", "output": "e"}], indent=2))
    prompts = read_prompts(path)
    assert [(p.id, p.prompt, p.meta["response"]) for p in prompts] == [("alpaca_data-1", "a", "b"),
                                                                       ("alpaca_data-2", "c\n\nd", "e")]
    lines = write_jsonl(tmp_path / "lines.json", [{"instruction": "a", "output": "b"}])  # .json, one object a line
    assert [p.meta["response"] for p in read_prompts(lines)] == ["b"]


def test_sharegpt_multi_turn_normalized(tmp_path: Path) -> None:
    conv = [{"from": "gpt", "value": "Welcome!"}, {"from": "system", "value": "sys"},
            {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2a"},
            {"from": "human", "value": "q2b"}, {"from": "chatgpt", "value": "a2"},
            {"from": "human", "value": "q3"}]
    path = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": conv}])
    (p,) = read_prompts(path)
    # leading assistant turn dropped, two user turns merged, the trailing user turn dropped
    assert p.meta["messages"] == [turn(S, "sys"), turn(U, "q1"), turn(A, "a1"), turn(U, "q2a\n\nq2b")]
    assert p.meta["response"] == "a2" and p.prompt == "q2a\n\nq2b" and p.meta["format"] == "sharegpt"


def test_messages_parquet_and_content_parts(tmp_path: Path) -> None:
    rows = [{"messages": [turn(U, "hi"), turn(A, "hello")]},
            {"messages": [turn(S, "s"), turn(U, "x"), turn(A, "y"), turn(U, "z"), turn(A, "w")]}]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    p1, p2 = read_prompts(path)
    assert p1.meta["messages"] == [turn(U, "hi")] and p1.meta["response"] == "hello"
    assert p2.meta["messages"] == [turn(S, "s"), turn(U, "x"), turn(A, "y"), turn(U, "z")] and p2.prompt == "z"
    parts = write_jsonl(tmp_path / "parts.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"}]}])
    assert read_prompts(parts)[0].prompt == "ab"


def test_prompt_completion_standard_and_conversational(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": [turn(S, "s"), turn(U, "hi")], "completion": [turn(A, "hey")]},
    ])
    p1, p2 = read_prompts(path)
    assert (p1.meta["messages"], p1.meta["response"]) == ([turn(U, "2+2?")], "4")
    assert (p2.meta["messages"], p2.meta["response"]) == ([turn(S, "s"), turn(U, "hi")], "hey")
    assert {p1.meta["format"], p2.meta["format"]} == {"prompt_completion"}


def test_datasets_directories(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "plain"))
    assert [p.prompt for p in read_prompts(tmp_path / "plain", limit=3)] == ["q0", "q1", "q2"]
    assert read_prompts(tmp_path / "plain")[0].id == "plain-1"
    other = datasets.Dataset.from_list([{"messages": [turn(U, "t"), turn(A, "u")]}])
    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": other})
    both.save_to_disk(str(tmp_path / "dd"))
    assert len(read_prompts(tmp_path / "dd")) == 5  # the train split
    datasets.DatasetDict({"test": other}).save_to_disk(str(tmp_path / "notrain"))
    with pytest.raises(AlignpipeError, match=r"notrain: a DatasetDict without a 'train' split \(splits: test\)"):
        read_prompts(tmp_path / "notrain")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AlignpipeError, match="not a `datasets` directory"):
        read_prompts(tmp_path / "empty")


def test_format_detection_and_explicit_format(tmp_path: Path) -> None:
    assert detect_format({"instruction": "", "input": "", "output": ""}) == "alpaca"
    assert detect_format({"conversations": [], "id": 1}) == "sharegpt"
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"prompt": "", "completion": ""}) == "prompt_completion"
    assert detect_format({"prompt": "", "answer": ""}) is None
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(AlignpipeError, match=r"d.jsonl: row 1: field 'messages': missing$"):
        read_prompts(path, "messages")


# ---------------------------------------------------------------- bad input


def one_line_error(path: Path, fmt: str = "auto") -> str:
    with pytest.raises(AlignpipeError) as info:
        read_prompts(path, fmt)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_response_field_names_file_row_line_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}],
                       blank_after=1)
    assert one_line_error(path) == f"{path}: row 2 (line 3): field 'output': missing"


def test_no_assistant_turn(tmp_path: Path) -> None:
    ok = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    bad = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}]}
    path = write_jsonl(tmp_path / "data.jsonl", [ok, ok, bad], blank_after=1)
    assert one_line_error(path) == f"{path}: row 3 (line 4): field 'conversations': no assistant turn"
    spoke_first = write_jsonl(tmp_path / "first.jsonl", [{"messages": [turn(A, "hi"), turn(U, "q")]}])
    assert one_line_error(spoke_first).endswith("row 1: field 'messages': no assistant turn after a user turn")


def test_unknown_keys_are_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    message = one_line_error(path)
    assert "row 1" in message and "(question, answer)" in message and "sharegpt (conversations)" in message


def test_non_utf8_line(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    assert one_line_error(path).startswith(f"{path}: line 2: not UTF-8 text (byte 0xe9")
    array = tmp_path / "latin.json"
    array.write_bytes(b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "caf\xe9", "output": "b"}\n]')
    assert one_line_error(array).startswith(f"{array}: line 3: not UTF-8 text (byte 0xe9")
    utf16 = tmp_path / "wide.json"
    utf16.write_text(json.dumps([{"instruction": "a", "output": "b"}]), encoding="utf-16")
    assert one_line_error(utf16) == f"{utf16}: not UTF-8 text (UTF-16, by its byte-order mark); save the file as UTF-8"


def test_bad_turns_name_the_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": [turn(U, "q"), {"role": "tool", "content": "x"}]}])
    assert "row 1: field 'messages': turn 2: unknown speaker 'tool'" in one_line_error(path)
    path = write_jsonl(tmp_path / "n.jsonl", [{"messages": [turn(U, "q"), {"role": A, "content": None}]}])
    assert one_line_error(path).endswith("row 1: field 'messages': turn 2: content: expected text, got NoneType")


def test_empty_last_response_is_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "a", "output": "b"},
                                              {"instruction": "c", "output": " "}])
    with caplog.at_level(logging.WARNING, logger="alignpipe.data.instructions"):
        assert [p.id for p in read_prompts(path)] == ["e-1"]
    assert "skipped 1 row(s) whose last assistant turn is empty (rows 2)" in caplog.text
    # an empty earlier turn is kept
    path = write_jsonl(tmp_path / "m.jsonl",
                       [{"messages": [turn(U, "q"), turn(A, ""), turn(U, "r"), turn(A, "s")]}])
    assert read_prompts(path)[0].meta["messages"] == [turn(U, "q"), turn(A, ""), turn(U, "r")]
    only_empty = write_jsonl(tmp_path / "o.jsonl", [{"instruction": "c", "output": ""}])
    assert "every row's last assistant turn is empty" in one_line_error(only_empty)


# ---------------------------------------------------------------- held-out split


def test_seeded_split_never_overlaps(tmp_path: Path) -> None:
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
    rows.append({"instruction": "q0", "output": "a0"})  # a duplicate
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    task = InstructionTask(path=str(path), heldout_fraction=0.5, seed=3)
    data = load(task, heldout_n=4)
    assert len(data.heldout) == 4 and not {p.id for p in data.heldout} & {p.id for p in data.train}
    held = {(p.prompt, p.meta["response"]) for p in data.heldout}
    assert not held & {(p.prompt, p.meta["response"]) for p in data.train}  # duplicates too
    assert [p.id for p in load(task, heldout_n=4).heldout] == [p.id for p in data.heldout]
    limited = load(task.model_copy(update={"limit": 6}), heldout_n=4)
    assert {p.id for p in limited.train + limited.heldout} == {f"s-{i}" for i in range(1, 7)}


def test_heldout_file_with_the_same_stem(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    train = write_jsonl(tmp_path / "a" / "d.jsonl", [{"instruction": f"q{i}", "output": "x"} for i in range(4)])
    held = write_jsonl(tmp_path / "b" / "d.jsonl", [{"instruction": f"q{i}", "output": "x"} for i in (0, 7, 8)])
    data = load(InstructionTask(path=str(train), heldout_path=str(held)), heldout_n=2)
    assert [p.id for p in data.heldout] == ["heldout-d-1", "heldout-d-2"]
    assert [p.prompt for p in data.train] == ["q1", "q2", "q3"]  # q0 is held out


# ---------------------------------------------------------------- encoding


@pytest.fixture()
def fresh_tok(tiny_model_path):
    """The tiny tokenizer (ChatML template, one token a character), loaded anew: tests change its template."""
    return load_tokenizer(tiny_model_path)


CONV = [turn(U, "hi"), turn(A, "ok"), turn(U, "no"), turn(A, "yes")]


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_multi_turn_mask_chatml(tok) -> None:
    ids, mask = encode_conversation(tok, CONV, 200)
    # <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n = 21 tokens; ok<|im_end|>; then
    # \n<|im_start|>user\nno<|im_end|>\n<|im_start|>assistant\n = 22 tokens; yes<|im_end|>
    assert mask == [0] * 21 + [1] * 3 + [0] * 22 + [1] * 4
    assert ids == ids_of(tok, tok.apply_chat_template(CONV, tokenize=False))[:-1]  # less the template's last "\n"
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    assert trained == ids_of(tok, "ok<|im_end|>yes<|im_end|>")
    with_system = encode_conversation(tok, [turn(S, "be")] + CONV, 200)[1]
    assert with_system == [0] * (21 + 12) + [1] * 3 + [0] * 22 + [1] * 4  # <|im_start|>system\nbe<|im_end|>\n


def test_multi_turn_without_a_template_uses_blocks(fresh_tok) -> None:
    fresh_tok.chat_template = None
    ids, mask = encode_conversation(fresh_tok, CONV, 200)
    eos = fresh_tok.eos_token_id
    assert ids == (ids_of(fresh_tok, "user: hi\n\nassistant:") + ids_of(fresh_tok, "ok") + [eos]
                   + ids_of(fresh_tok, "\n\nuser: no\n\nassistant:") + ids_of(fresh_tok, "yes") + [eos])
    assert mask == [0] * 20 + [1] * 3 + [0] * 22 + [1] * 4


def test_trimming_template_with_its_own_turn_end(fresh_tok) -> None:
    fresh_tok.chat_template = ("{% for m in messages %}#{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}"
                               "{% if add_generation_prompt %}#assistant: {% endif %}")
    conv = [turn(U, "hi"), turn(A, " ok "), turn(U, "no"), turn(A, "yes")]
    ids, mask = encode_conversation(fresh_tok, conv, 200)
    eos = fresh_tok.eos_token_id
    assert ids == (ids_of(fresh_tok, "#user: hi\n#assistant: ") + ids_of(fresh_tok, " ok ") + [eos]
                   + ids_of(fresh_tok, "\n#user: no\n#assistant: ") + ids_of(fresh_tok, "yes") + [eos])
    assert mask == [0] * 22 + [1] * 5 + [0] * 23 + [1] * 4


def test_template_rewriting_history_trains_the_last_turn_only(fresh_tok) -> None:
    fresh_tok.chat_template = ("{% for m in messages %}#{{ m['role'] }}: "
                               "{% if m['role'] == 'assistant' %}.{% else %}{{ m['content'] }}{% endif %}"
                               "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}#assistant: {% endif %}")
    ids, mask = encode_conversation(fresh_tok, CONV, 200)
    context = "#user: hi\n#assistant: .\n#user: no\n#assistant: "
    assert ids == ids_of(fresh_tok, context) + ids_of(fresh_tok, "yes") + [fresh_tok.eos_token_id]
    assert mask == [0] * len(context) + [1] * 4


@pytest.mark.parametrize("template", [True, False])
@pytest.mark.parametrize("max_length", [200, 30, 12, 5, 2])
def test_single_turn_equals_encode(fresh_tok, template: bool, max_length: int) -> None:
    if not template:
        fresh_tok.chat_template = None
    for user, answer in [("What is 2 + 3?", "it is 5"), ("hi", ""), ("x", "a much longer answer here")]:
        expected = encode(fresh_tok, format_messages(fresh_tok, [turn(U, user)]), answer, False, max_length)
        assert encode_conversation(fresh_tok, [turn(U, user), turn(A, answer)], max_length) == expected


def test_over_long_conversations_lose_the_oldest_context_first(tok) -> None:
    ids, mask = encode_conversation(tok, CONV, 200)
    assert encode_conversation(tok, CONV, 30) == (ids[-30:], mask[-30:])  # cuts into the first turns
    # the last turn (4 tokens) keeps its head, after one context token, as `encode` keeps a completion
    short, short_mask = encode_conversation(tok, CONV, 3)
    assert short == [ids[-5]] + ids[-4:-2] and short_mask == [0, 1, 1]


def test_assistant_turns_before_the_first_user_turn_are_context(tok) -> None:
    ids, mask = encode_conversation(tok, [turn(A, "hey")] + CONV[:2], 200)
    assert sum(mask) == 3 and ids == ids_of(tok, tok.apply_chat_template([turn(A, "hey")] + CONV[:2],
                                                                         tokenize=False))[:-1]
    with pytest.raises(ValueError, match="assistant turn after a user turn"):
        encode_conversation(tok, [turn(U, "q")], 10)


def test_loaded_prompt_renders_and_trains_like_its_conversation(tok, tmp_path: Path) -> None:
    from alignpipe.synthesis.transformers_backend import render_prompt

    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": CONV}])
    (p,) = read_prompts(path)
    assert render_prompt(tok, p) == format_messages(tok, CONV[:3])
    full = encode_conversation(tok, p.meta["messages"] + [turn(A, p.meta["response"])], 200)
    assert full == encode_conversation(tok, CONV, 200)
