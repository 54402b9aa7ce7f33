"""Human-labelled preference pairs as `(Prompt, chosen Candidate, rejected Candidate)` triples.

Two input formats (jsonl or parquet), detected per file:

- **hh-rlhf**: `chosen` and `rejected` are whole dialogues (`\\n\\nHuman: ... \\n\\nAssistant: ...`) that share
  a prefix. The prompt is the shared prefix cut back to the end of its last `\\n\\nAssistant:` tag; each
  response is the rest of its dialogue, verbatim (some hh-rlhf responses themselves contain "Human:"
  or "Assistant:" text; a per-dialogue "last Assistant tag" split would cut them wrongly).
- **TRL preference**: `prompt`, `chosen`, `rejected` as strings (standard) or as message lists
  (conversational; the prompt may be implicit, i.e. the shared leading messages of chosen/rejected).

The prompt's chat messages are kept in `Prompt.meta["messages"]`; `Prompt.prompt` is the user text for a
single-turn prompt and a "Human: / Assistant:" transcript for a multi-turn one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from alignpipe import AlignpipeError
from alignpipe.records import Candidate, Prompt

Message = dict[str, str]
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_ROLES = {"user", "assistant", "system"}


class LabelledPair(NamedTuple):
    prompt: Prompt
    chosen: Candidate
    rejected: Candidate


class PairFormatError(ValueError):
    """A malformed row; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# ---------------------------------------------------------------- hh-rlhf dialogues


def parse_hh_dialogue(text: str) -> list[Message]:
    """`"\\n\\nHuman: a\\n\\nAssistant: b"` -> `[{"role": "user", ...}, {"role": "assistant", ...}]`.

    Only tags at a turn boundary (preceded by a blank line) start a turn; consecutive turns of one role
    are merged into one message."""
    out: list[Message] = []
    pos = 0
    while pos < len(text):
        nxt = [(i, tag) for tag in (HUMAN, ASSISTANT) if (i := text.find(tag, pos)) >= 0]
        if not nxt:
            if not out:
                raise PairFormatError("chosen", "no '\\n\\nHuman:' turn found")
            out[-1]["content"] += text[pos:]
            break
        i, tag = min(nxt)
        if out:
            out[-1]["content"] += text[pos:i]
        elif text[:i].strip():
            raise PairFormatError("chosen", "text before the first '\\n\\nHuman:' turn")
        out.append({"role": "user" if tag == HUMAN else "assistant", "content": ""})
        pos = i + len(tag)
    merged: list[Message] = []
    for m in out:  # a few real dialogues have two Assistant turns in a row: one message, as chat templates expect
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1]["content"] += "\n\n" + m["content"].strip()
        else:
            merged.append({"role": m["role"], "content": m["content"].strip()})
    return merged


def split_hh_pair(chosen: str, rejected: str) -> tuple[list[Message], str, str]:
    """(prompt messages, chosen response, rejected response) of one hh-rlhf pair."""
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str) or HUMAN not in value:
            raise PairFormatError(name, "expected an hh-rlhf dialogue containing '\\n\\nHuman:'")
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT)
    if cut < 0:
        raise PairFormatError("rejected", "chosen and rejected share no prefix ending in '\\n\\nAssistant:'")
    cut += len(ASSISTANT)
    messages = parse_hh_dialogue(chosen[:cut])
    if messages[-1]["role"] != "assistant" or messages[-1]["content"]:
        raise PairFormatError("chosen", "shared prefix does not end with an empty Assistant turn")
    return messages[:-1], chosen[cut:].strip(), rejected[cut:].strip()


# ---------------------------------------------------------------- TRL rows


def _check_messages(value: Any, name: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise PairFormatError(name, "expected a non-empty list of messages")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in _ROLES:
            raise PairFormatError(name, f"message {j} needs 'role' (user/assistant/system) and text 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def split_trl_row(row: dict) -> tuple[list[Message], str, str]:
    """(prompt messages, chosen response, rejected response) of a TRL preference row."""
    for name in ("chosen", "rejected"):
        if name not in row:
            raise PairFormatError(name, "missing field")
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if isinstance(chosen, str) or isinstance(rejected, str):
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str):
                raise PairFormatError(name, "expected text like the other response")
        if prompt is None:
            return split_hh_pair(chosen, rejected)
        if isinstance(prompt, str):
            if not prompt.strip():
                raise PairFormatError("prompt", "empty")
            return [{"role": "user", "content": prompt}], chosen, rejected
        return _check_messages(prompt, "prompt"), chosen, rejected
    c_msgs, r_msgs = _check_messages(chosen, "chosen"), _check_messages(rejected, "rejected")
    if prompt is None:  # implicit prompt: the shared leading messages
        k = 0
        while k < min(len(c_msgs), len(r_msgs)) - 1 and c_msgs[k] == r_msgs[k]:
            k += 1
        if k == 0:
            raise PairFormatError("prompt", "missing, and chosen/rejected share no leading messages")
        p_msgs, c_msgs, r_msgs = c_msgs[:k], c_msgs[k:], r_msgs[k:]
    else:
        p_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _check_messages(prompt, "prompt")
    for name, msgs in (("chosen", c_msgs), ("rejected", r_msgs)):
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise PairFormatError(name, "expected exactly one assistant message after the prompt")
    return p_msgs, c_msgs[0]["content"], r_msgs[0]["content"]


# ---------------------------------------------------------------- records


def render_messages(messages: list[Message]) -> str:
    """The prompt text: the user message alone for one turn, else a Human/Assistant transcript."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in messages)


def make_pair(pid: str, messages: list[Message], chosen: str, rejected: str, source: str = "",
              task: str = "chat") -> LabelledPair:
    prompt = Prompt(id=pid, prompt=render_messages(messages), task=task,
                    meta={"messages": messages, "source": source})
    return LabelledPair(
        prompt,
        Candidate(prompt_id=pid, id=f"{pid}/chosen", completion=chosen, source={"label": "chosen", "data": source}),
        Candidate(prompt_id=pid, id=f"{pid}/rejected", completion=rejected,
                  source={"label": "rejected", "data": source}),
    )


def pairs_from_rows(rows: list[dict], source: str = "rows", fmt: str = "auto") -> list[LabelledPair]:
    """Triples from already-read rows; `fmt` is auto / hh / trl. Errors name source, row and field."""
    if fmt not in ("auto", "hh", "trl"):
        raise AlignpipeError(f"unknown pair format {fmt!r} (expected auto, hh or trl)")
    from alignpipe.data.files import row_label

    out = []
    for k, row in enumerate(rows):
        # an empty response is a response: real hh-rlhf rows have one (the human preferred silence), and a
        # judge compares it like any other (the `longer` judge prefers the other one)
        try:
            if not isinstance(row, dict):
                raise PairFormatError("row", "expected an object")
            if fmt == "hh":
                messages, chosen, rejected = split_hh_pair(row.get("chosen"), row.get("rejected"))
            else:
                messages, chosen, rejected = split_trl_row(row)
        except PairFormatError as exc:
            raise AlignpipeError(f"{source}: {row_label(rows, k)}: field '{exc.field}': {exc}") from None
        pid = str(row.get("id", f"{Path(source).stem}:{k + 1}"))
        out.append(make_pair(pid, messages, chosen, rejected, source=str(source)))
    return out


def load_pairs(path: str | Path, fmt: str = "auto", limit: int | None = None) -> list[LabelledPair]:
    """Pairs from a jsonl or parquet file (hh-rlhf or TRL format)."""
    from alignpipe.data.files import read_rows

    if limit is not None and limit < 1:
        raise AlignpipeError(f"--limit must be at least 1, got {limit}")
    rows = read_rows(path, "pairs")
    if limit is not None:
        rows = rows.head(limit)
    return pairs_from_rows(rows, str(path), fmt)
