"""Loading human-labelled pairs: hh-rlhf dialogues (real rows) and TRL preference rows."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignpipe import AlignpipeError
from alignpipe.data.pairs import load_pairs, pairs_from_rows, parse_hh_dialogue, split_hh_pair

HH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl"


@pytest.fixture(scope="module")
def hh_rows() -> list[dict]:
    if not HH.is_file():
        pytest.skip("shared/data/hh-rlhf-harmless is not beside the repository")
    return [json.loads(line) for line in HH.read_text().splitlines() if line.strip()]


def test_parse_hh_dialogue_turns() -> None:
    msgs = parse_hh_dialogue("\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: bye")
    assert msgs == [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "bye"}]


def test_all_real_rows_load_with_a_user_turn_last(hh_rows: list[dict]) -> None:
    pairs = load_pairs(HH)
    assert len(pairs) == len(hh_rows) == 1156
    for (prompt, chosen, rejected), row in zip(pairs, hh_rows, strict=True):
        messages = prompt.meta["messages"]
        assert messages[-1]["role"] == "user"
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2) + ["user"]
        assert row["chosen"].endswith(chosen.completion) and row["rejected"].endswith(rejected.completion)
        assert chosen.id != rejected.id and chosen.prompt_id == rejected.prompt_id == prompt.id
        assert chosen.source["label"] == "chosen" and rejected.source["label"] == "rejected"


def test_real_multi_turn_row(hh_rows: list[dict]) -> None:
    row = hh_rows[0]  # five-message prefix, the last Assistant turns differ
    messages, chosen, rejected = split_hh_pair(row["chosen"], row["rejected"])
    assert len(messages) == 5 and messages[0]["content"] == "what are some pranks with a pen i can do?"
    assert messages[-1]["content"] == "okay some of these do not have anything to do with pens"
    assert chosen.startswith("No, sorry!") and rejected.startswith("There are lots of funny things")
    prompt = load_pairs(HH, limit=1)[0].prompt
    assert prompt.prompt.startswith("Human: what are some pranks") and "\n\nAssistant: " in prompt.prompt


def test_real_rows_whose_responses_contain_turn_tags(hh_rows: list[dict]) -> None:
    # row 627: the chosen response itself contains "Human: ...\n\nAssistant:" text; it must stay whole
    messages, chosen, rejected = split_hh_pair(hh_rows[626]["chosen"], hh_rows[626]["rejected"])
    assert messages[-1]["content"] == "Isn't that drag kings?" and len(messages) == 3
    assert "Human: Then how do they come to be called drag kings" in chosen
    assert chosen.endswith("I think they call them that because")
    assert rejected.startswith("A drag king is the opposite")
    # row 1012: both responses start with the same words ("Human: Okay, so"): the prompt stops at the tag
    messages, chosen, rejected = split_hh_pair(hh_rows[1011]["chosen"], hh_rows[1011]["rejected"])
    assert messages[-1]["content"] == "Yes, I have that."
    assert chosen.startswith("Human: Okay, so once") and rejected.startswith("Human: Okay, so first")


def test_consecutive_turns_of_one_role_merge(hh_rows: list[dict]) -> None:
    messages, _, _ = split_hh_pair(hh_rows[922]["chosen"], hh_rows[922]["rejected"])  # two Assistant turns in a row
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[3]["content"].startswith("Here’s a short joke from a friend:\n\n“Question:")


def test_single_turn_prompt_is_plain_text() -> None:
    (p, c, r), = pairs_from_rows([{"chosen": "\n\nHuman: Why?\n\nAssistant: Because.",
                                   "rejected": "\n\nHuman: Why?\n\nAssistant: No."}])
    assert p.prompt == "Why?" and c.completion == "Because." and r.completion == "No."


def test_trl_standard_and_conversational_rows(tmp_path: Path) -> None:
    rows = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "assistant", "content": "go away"}]},
        {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]},
        {"id": "x7", "chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
    ]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:1]), path)
    (p, c, r), = load_pairs(path)
    assert (p.prompt, c.completion, r.completion) == ("2+2?", "4", "5")
    out = pairs_from_rows(rows, "mem.jsonl")
    assert [(x.prompt.prompt, x.chosen.completion, x.rejected.completion) for x in out] == [
        ("2+2?", "4", "5"), ("hi", "hello", "go away"), ("q", "good", "bad"), ("a", "b", "c")]
    assert out[3].prompt.id == "x7" and out[0].prompt.id == "mem:1"


@pytest.mark.parametrize("row, field", [
    ({"prompt": "p", "chosen": "a"}, "rejected"),
    ({"prompt": "p", "chosen": "a", "rejected": 3}, "rejected"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt"),
    ({"prompt": "p", "chosen": [{"role": "bot", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]},
     "chosen"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: c"}, "rejected"),
    ({"chosen": "no dialogue here", "rejected": "nor here"}, "chosen"),
])
def test_errors_name_source_row_and_field(row: dict, field: str) -> None:
    with pytest.raises(AlignpipeError, match=rf"^f\.jsonl: row 2: field '{field}'"):
        pairs_from_rows([{"prompt": "ok", "chosen": "a", "rejected": "b"}, row], "f.jsonl")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(AlignpipeError, match="pairs file not found"):
        load_pairs(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{not json\n')
    with pytest.raises(AlignpipeError, match="bad.jsonl: line 2"):
        load_pairs(bad)
