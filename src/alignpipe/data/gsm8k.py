"""GSM8K in its original jsonl format (`question`, `answer` = worked solution ending in `#### <number>`)."""

from __future__ import annotations

import random

from alignpipe import AlignpipeError
from alignpipe.data import TaskData
from alignpipe.data.files import read_rows, row_label
from alignpipe.records import Prompt


def final_answer(solution: str) -> str:
    """The number after `####` in a GSM8K worked solution, commas removed."""
    if "####" not in solution:
        raise ValueError("no '####' in the solution")
    return solution.split("####")[-1].strip().replace(",", "")


def to_prompts(rows: list[dict], path: str, instruction: str) -> list[Prompt]:
    prompts = []
    for i, row in enumerate(rows, start=1):
        where = row_label(rows, i - 1)
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str):
                raise AlignpipeError(f"{path}: {where}: missing or non-text field {key!r}")
        try:
            answer = final_answer(row["answer"])
        except ValueError as exc:
            raise AlignpipeError(f"{path}: {where}: field 'answer': {exc}") from None
        text = f"{row['question'].strip()}\n{instruction}".strip()
        prompts.append(Prompt(id=f"gsm8k:{i}", prompt=text, task="math", reference=answer,
                              meta={"solution": row["answer"]}))
    return prompts


def load(task, heldout_n: int) -> TaskData:  # noqa: ANN001
    prompts = to_prompts(read_rows(task.path), task.path, task.instruction)
    random.Random(task.seed).shuffle(prompts)
    n_held = min(heldout_n, max(1, int(len(prompts) * task.heldout_fraction)))
    return TaskData(train=prompts[n_held:], heldout=prompts[:n_held])
