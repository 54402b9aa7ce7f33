"""Prompt files: jsonl or parquet rows with `prompt` (or `question`), an optional `answer`, and optional
`rules` / `rules_mode` for the rule verifier (kept in `Prompt.meta`)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from alignpipe import AlignpipeError
from alignpipe.data import TaskData
from alignpipe.records import Prompt


def jsonl_objects(path: Path, what: str = "a JSON object") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a jsonl file; a line that is not a JSON object is an
    error naming the file and the line."""
    with path.open() as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AlignpipeError(f"{path}: line {i}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise AlignpipeError(f"{path}: line {i}: expected {what}")
            yield i, row


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a jsonl or parquet file; errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise AlignpipeError(f"prompts file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 - any pyarrow failure means an unreadable file
            raise AlignpipeError(f"{path}: not a readable parquet file ({exc})") from None
    rows = [row for _, row in jsonl_objects(path)]
    if not rows:
        raise AlignpipeError(f"{path}: no rows")
    return rows


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
    for i, row in enumerate(rows, start=1):
        text = row.get("prompt", row.get("question"))
        if not isinstance(text, str) or not text.strip():
            raise AlignpipeError(f"{path}: row {i}: missing or empty field 'prompt' (or 'question')")
        answer = row.get("answer")
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise AlignpipeError(f"{path}: row {i}: field 'answer' must be text or a number")
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
