"""Instruction data (demonstrations to imitate) in the formats people have, as chat prompts with gold responses.

Why: instruction tuning and self-play need conversations whose assistant turns are the targets, and such data
comes in a handful of shapes. Each row becomes one normalized conversation (turns `{"role": system|user|
assistant, "content": str}`) and then one `Prompt` whose `meta["messages"]` are the turns before the last
assistant turn (ending with a user turn: what the sampler renders, `render_prompt`) and whose
`meta["response"]` is that last assistant turn (the gold response, `gold_response`).

Sources: jsonl (`.json` too, one object a line, or a whole JSON array as Alpaca ships it), parquet, or a local
Hugging Face `datasets` directory (`save_to_disk`; of a DatasetDict, the `train` split). Formats, detected from
the first row's keys unless `task.format` names one:

- **alpaca**: `instruction`, optional `input` (appended after a blank line when not empty), `output`; optional
  `system` and `history` (`[[instruction, response], ...]` earlier turns, as LLaMA-Factory writes them).
- **sharegpt**: `conversations`, a list of `{from, value}` (from: human/user, gpt/assistant/chatgpt/..., system);
  an optional top-level `system`.
- **messages**: `messages`, a list of `{role, content}` (content text, or a list of `{type: text, text}` parts).
- **prompt_completion**: TRL's `prompt` and `completion`, each text (a user / an assistant turn) or a message
  list (conversational).

Normalization: consecutive turns of one role are merged (blank line between), assistant turns before the first
user turn are dropped (a model is not taught to speak first), and so are the turns after the last assistant turn.
A row with no assistant turn after a user turn, or without its response field, is an error naming the file, the
row (and its line in a jsonl file) and the field. A row whose last assistant turn is empty is skipped and
counted (a warning): there is nothing to imitate, and a gold source needs a response; empty earlier turns are
kept as they are. Prompt ids are `{file stem}-{row}`, rows counted from 1 as in the errors.
"""

from __future__ import annotations

import codecs
import json
import logging
import random
from pathlib import Path
from typing import Any

from alignpipe import AlignpipeError
from alignpipe.data import TaskData
from alignpipe.data.files import Rows, read_rows, row_label
from alignpipe.records import Prompt

log = logging.getLogger(__name__)
Message = dict[str, str]
FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion")
ROLES = {"user": "user", "human": "user", "system": "system", "assistant": "assistant", "gpt": "assistant",
         "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
         "bot": "assistant"}


class RowError(ValueError):
    """A malformed row; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# ---------------------------------------------------------------- reading


def read_source(path: str | Path, limit: int | None = None) -> Rows:
    """The rows of a jsonl / json / parquet file or a saved `datasets` directory (its first `limit`)."""
    path = Path(path)
    if path.is_dir():
        rows = _read_datasets_dir(path, limit)
    elif not path.is_file():
        hint = " (run `alignpipe run self-instruct` first: it writes that file)" if \
            path.as_posix().endswith("self-instruct/instructions.jsonl") else ""
        raise AlignpipeError(f"instruction data not found: {path}{hint}")
    elif path.suffix == ".json" and _json_array(path):
        rows = _read_json_array(path)
    else:
        rows = read_rows(path, "instruction data")
    return rows if limit is None else rows.head(limit)


def _json_array(path: Path) -> bool:
    """Whether a .json file is one JSON array (Alpaca's own files) rather than one object a line."""
    with path.open("rb") as fh:
        return fh.read(4096).removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"[")


def _read_json_array(path: Path) -> Rows:
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise AlignpipeError(f"{path}: line {line}: not UTF-8 text (byte {raw[exc.start]:#04x}); save the file "
                             "as UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AlignpipeError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    for k, row in enumerate(data):
        if not isinstance(row, dict):
            raise AlignpipeError(f"{path}: row {k + 1}: expected a JSON object")
    if not data:
        raise AlignpipeError(f"{path}: no rows")
    return Rows(data)


def _read_datasets_dir(path: Path, limit: int | None) -> Rows:
    if not any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise AlignpipeError(f"{path}: a directory, but not a `datasets` directory saved with save_to_disk "
                             "(no dataset_info.json or dataset_dict.json)")
    try:
        import datasets
    except ImportError:
        raise AlignpipeError(f"{path}: reading a `datasets` directory needs the datasets package "
                             "(pip install datasets)") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure here means an unreadable directory
        reason = " ".join(str(exc).split())  # the error is one line
        raise AlignpipeError(f"{path}: not a readable `datasets` directory ({reason})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise AlignpipeError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    if len(ds) == 0:
        raise AlignpipeError(f"{path}: no rows")
    return Rows(ds.select(range(min(limit, len(ds)))).to_list() if limit else ds.to_list())


# ---------------------------------------------------------------- formats


def detect_format(row: dict) -> str | None:
    """The format a row's keys say, or None."""
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        return "messages"
    if "instruction" in row:
        return "alpaca"
    if "completion" in row:
        return "prompt_completion"
    return None


def _text(value: Any, field: str, where: str = "") -> str:
    """Text, or the text parts of a multimodal-style content list joined."""
    if isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        value = "".join(str(p.get("text") or "") for p in value)
    if not isinstance(value, str):
        raise RowError(field, f"{where}expected text, got {type(value).__name__}")
    return value


def _turn_list(value: Any, field: str) -> list[Message]:
    """A list of `{role, content}` or `{from, value}` turns (either spelling in either format)."""
    if not isinstance(value, list) or not value:
        raise RowError(field, "expected a non-empty list of turns")
    out = []
    for j, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            raise RowError(field, f"turn {j}: expected an object")
        speaker = turn.get("from") if turn.get("from") is not None else turn.get("role")
        role = None if speaker is None else ROLES.get(str(speaker).lower())
        if role is None:
            raise RowError(field, f"turn {j}: unknown speaker {speaker!r} (expected one of {', '.join(ROLES)})")
        content = turn.get("value") if turn.get("value") is not None else turn.get("content")
        out.append({"role": role, "content": _text(content, field, f"turn {j}: content: ")})
    return out


def _required(row: dict, field: str) -> Any:
    if row.get(field) is None:
        raise RowError(field, "missing")
    return row[field]


def _system(row: dict) -> list[Message]:
    value = row.get("system")
    return [{"role": "system", "content": value}] if isinstance(value, str) and value.strip() else []


def parse_row(row: dict, fmt: str) -> tuple[list[Message], str]:
    """(turns as written, the field that holds the responses) of one row in format `fmt`."""
    if fmt == "alpaca":
        instruction = _text(_required(row, "instruction"), "instruction")
        extra = row.get("input")
        extra = "" if extra is None else _text(extra, "input")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        if not user.strip():
            raise RowError("instruction", "empty")
        output = _text(_required(row, "output"), "output")
        history = row.get("history") or []
        if not isinstance(history, list) or not all(isinstance(h, list | tuple) and len(h) == 2 for h in history):
            raise RowError("history", "expected a list of [instruction, response] pairs")
        turns = [{"role": role, "content": _text(text, "history", "each entry: ")}
                 for pair in history for role, text in zip(("user", "assistant"), pair, strict=True)]
        return _system(row) + turns + [{"role": "user", "content": user},
                                       {"role": "assistant", "content": output}], "output"
    if fmt == "sharegpt":
        return _system(row) + _turn_list(_required(row, "conversations"), "conversations"), "conversations"
    if fmt == "messages":
        return _turn_list(_required(row, "messages"), "messages"), "messages"
    prompt, completion = _required(row, "prompt"), _required(row, "completion")
    before = ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else _turn_list(prompt, "prompt"))
    after = ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
             else _turn_list(completion, "completion"))
    return before + after, "completion"


def normalize(turns: list[Message], field: str) -> list[Message]:
    """Merge runs of one role, drop assistant turns before the first user turn and turns after the last
    assistant turn; the result ends with an assistant turn right after a user turn."""
    merged: list[Message] = []
    for t in turns:
        if merged and merged[-1]["role"] == t["role"]:
            merged[-1] = {"role": t["role"], "content": f"{merged[-1]['content']}\n\n{t['content']}"}
        else:
            merged.append(dict(t))
    spoke = any(t["role"] == "assistant" for t in merged)
    first_user = next((i for i, t in enumerate(merged) if t["role"] == "user"), len(merged))
    merged = [t for i, t in enumerate(merged) if i >= first_user or t["role"] != "assistant"]
    last = max((i for i, t in enumerate(merged) if t["role"] == "assistant"), default=None)
    if last is None:
        raise RowError(field, "no assistant turn after a user turn" if spoke else "no assistant turn")
    if merged[last - 1]["role"] != "user":
        before = merged[last - 1]["role"]
        raise RowError(field, f"the last assistant turn follows a {before} turn, not a user turn")
    return merged[: last + 1]


# ---------------------------------------------------------------- prompts


def to_prompts(rows: Rows, path: str | Path, fmt: str = "auto") -> list[Prompt]:
    """A prompt per row (rows with an empty last response skipped, with a warning); errors name file/row/field."""
    if fmt not in ("auto", *FORMATS):
        raise AlignpipeError(f"unknown instruction format {fmt!r} (expected auto, {', '.join(FORMATS)})")
    if not rows:
        raise AlignpipeError(f"{path}: no rows")
    if fmt == "auto":
        fmt = detect_format(rows[0]) or ""
        if not fmt:
            raise AlignpipeError(
                f"{path}: {row_label(rows, 0)}: no known instruction format in its keys ({', '.join(rows[0])}); "
                "expected alpaca (instruction, output), sharegpt (conversations), messages (messages) or "
                "prompt_completion (prompt, completion)")
    stem, prompts, skipped = Path(path).stem, [], []
    for k, row in enumerate(rows):
        try:
            turns, field = parse_row(row, fmt)
            conversation = normalize(turns, field)
        except RowError as exc:
            raise AlignpipeError(f"{path}: {row_label(rows, k)}: field '{exc.field}': {exc}") from None
        context, response = conversation[:-1], conversation[-1]["content"]
        if not response.strip():
            skipped.append(k + 1)
            continue
        prompts.append(Prompt(id=f"{stem}-{k + 1}", prompt=context[-1]["content"], task="chat",
                              meta={"messages": context, "response": response, "format": fmt, "row": k + 1}))
    if skipped:
        log.warning("%s: skipped %d row(s) whose last assistant turn is empty (rows %s%s)", path, len(skipped),
                    ", ".join(map(str, skipped[:10])), ", ..." if len(skipped) > 10 else "")
    if not prompts:
        raise AlignpipeError(f"{path}: every row's last assistant turn is empty; nothing to learn from")
    return prompts


def read_prompts(path: str | Path, fmt: str = "auto", limit: int | None = None) -> list[Prompt]:
    """The prompts of an instruction file or `datasets` directory (its first `limit` rows)."""
    return to_prompts(read_source(path, limit), path, fmt)


def _key(p: Prompt) -> str:
    return json.dumps([p.meta["messages"], p.meta["response"]], sort_keys=True)


def load(task, heldout_n: int) -> TaskData:  # noqa: ANN001 - config.InstructionTask
    """Training and held-out prompts: held-out from `heldout_path` (its first `heldout_n`) or a seeded split of
    `heldout_fraction` (at most `heldout_n`); training conversations identical to a held-out one are left out,
    so the two never overlap."""
    prompts = read_prompts(task.path, task.format, task.limit)
    if task.heldout_path:
        heldout = read_prompts(task.heldout_path, task.format)[:heldout_n]
        taken = {p.id for p in prompts}
        for p in heldout:  # same file stem on both sides: keep ids unique
            if p.id in taken:
                p.id = f"heldout-{p.id}"
    else:
        random.Random(task.seed).shuffle(prompts)
        n_held = min(heldout_n, max(1, int(len(prompts) * task.heldout_fraction)))
        heldout, prompts = prompts[:n_held], prompts[n_held:]
    held = {_key(p) for p in heldout}
    train = [p for p in prompts if _key(p) not in held]
    if not train:
        raise AlignpipeError(f"{task.path}: no training conversation left after the held-out ones "
                             f"({len(heldout)}) were taken out")
    return TaskData(train=train, heldout=heldout)
