"""Prompt files: jsonl or parquet rows with `prompt` (or `question`), an optional `answer`, and optional
`rules` / `rules_mode` for the rule verifier (kept in `Prompt.meta`)."""

from __future__ import annotations

import codecs
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from alignpipe import AlignpipeError
from alignpipe.data import TaskData
from alignpipe.records import Prompt

UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def not_utf16(path: Path, head: bytes, what: str = "file") -> None:
    """A UTF-16 file (what Windows editors save as "Unicode") is named as such, not reported as a bad byte."""
    if head.startswith(UTF16_BOMS):
        raise AlignpipeError(f"{path}: not UTF-8 text (UTF-16, by its byte-order mark); save the {what} as UTF-8")


def jsonl_objects(path: Path, what: str = "a JSON object") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a jsonl file; a line that is not UTF-8 text or not a
    JSON object is an error naming the file and the line."""
    with path.open("rb") as fh:  # bytes: a decoding error is then one line's, and named by it
        for i, raw in enumerate(fh, start=1):
            if i == 1:
                not_utf16(path, raw)
                raw = raw.removeprefix(codecs.BOM_UTF8)  # some editors mark UTF-8 too; harmless
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise AlignpipeError(f"{path}: line {i}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                                     f"{exc.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AlignpipeError(f"{path}: line {i}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise AlignpipeError(f"{path}: line {i}: expected {what}")
            yield i, row


class Rows(list):
    """Rows read from a file. `lines[k]` is the line of row k in a jsonl file (blank lines are skipped, so the
    two can differ), so that an error about a row also names the line an editor shows; None for parquet."""

    def __init__(self, rows: Iterable[dict] = (), lines: list[int] | None = None) -> None:
        super().__init__(rows)
        self.lines = lines

    def head(self, n: int) -> Rows:
        return Rows(self[:n], None if self.lines is None else self.lines[:n])


def row_label(rows: list[dict], k: int) -> str:
    """How errors name row k (0-based): `row N`, and `row N (line M)` where blank lines of a jsonl file put it
    on another line."""
    lines = getattr(rows, "lines", None)
    return f"row {k + 1}" if lines is None or lines[k] == k + 1 else f"row {k + 1} (line {lines[k]})"


def read_rows(path: str | Path, what: str = "prompts") -> Rows:
    """Rows of a jsonl or parquet file; errors name the file and the line."""
    path = Path(path)
    if path.is_dir():
        raise AlignpipeError(f"{path}: a directory, not a {what} file")
    if not path.is_file():
        raise AlignpipeError(f"{what} file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return Rows(pq.read_table(path).to_pylist())
        except Exception as exc:  # noqa: BLE001 - any pyarrow failure means an unreadable file
            reason = " ".join(str(exc).split())  # pyarrow's messages can span lines; the error is one line
            raise AlignpipeError(f"{path}: not a readable parquet file ({reason})") from None
    numbered = list(jsonl_objects(path))
    if not numbered:
        raise AlignpipeError(f"{path}: no rows")
    return Rows([row for _, row in numbered], [i for i, _ in numbered])


def _rule_meta(row: dict) -> dict:
    """A row's `rules` / `rules_mode` (for `evaluation.judge: rule_verifier`, which scores each rule as its
    own dimension `rule:<name>`). Parquet unifies the specs' keys across rows, filling absent ones with null:
    those are dropped again."""
    meta = {k: row[k] for k in ("rules", "rules_mode") if row.get(k) is not None}
    if isinstance(meta.get("rules"), list):
        meta["rules"] = [{k: v for k, v in spec.items() if v is not None} if isinstance(spec, dict) else spec
                         for spec in meta["rules"]]
    return meta


def to_prompts(rows: list[dict], path: str | Path, instruction: str = "") -> list[Prompt]:
    prompts = []
    for k, row in enumerate(rows):
        i, where = k + 1, row_label(rows, k)
        text = row.get("prompt", row.get("question"))
        if not isinstance(text, str) or not text.strip():
            raise AlignpipeError(f"{path}: {where}: missing or empty field 'prompt' (or 'question')")
        answer = row.get("answer")
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise AlignpipeError(f"{path}: {where}: field 'answer' must be text or a number")
        full = f"{text.strip()}\n{instruction}".strip() if instruction else text.strip()
        meta = _rule_meta(row)
        if isinstance(row.get("response"), str) and row["response"].strip():  # a gold response (self_play)
            meta["response"] = row["response"]
        prompts.append(Prompt(id=str(row.get("id", f"file:{i}")), prompt=full, task=row.get("task", "math"),
                              reference=None if answer is None else str(answer), meta=meta))
    return prompts


def load(task, heldout_n: int) -> TaskData:  # noqa: ANN001
    prompts = to_prompts(read_rows(task.path), task.path, task.instruction)
    if task.heldout_path:
        return TaskData(train=prompts, heldout=to_prompts(read_rows(task.heldout_path), task.heldout_path,
                                                          task.instruction)[:heldout_n])
    random.Random(task.seed).shuffle(prompts)
    n_held = min(heldout_n, max(1, int(len(prompts) * task.heldout_fraction)))
    return TaskData(train=prompts[n_held:], heldout=prompts[:n_held])
