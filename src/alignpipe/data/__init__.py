"""Prompt sources: built-in tasks (arithmetic, GSM8K, HumanEval) and prompt files. Each yields `Prompt` records
split into a training pool and a held-out set that never overlap."""

from __future__ import annotations

from dataclasses import dataclass

from alignpipe.records import Prompt


@dataclass
class TaskData:
    train: list[Prompt]
    heldout: list[Prompt]


def load_task(task, heldout_n: int) -> TaskData:  # noqa: ANN001 - a config.Task union
    from alignpipe.data import arithmetic, files, gsm8k, humaneval, instructions, preferences

    loaders = {"arithmetic": arithmetic.load, "gsm8k": gsm8k.load, "file": files.load,
               "preferences": preferences.load, "humaneval": humaneval.load, "instructions": instructions.load}
    return loaders[task.kind](task, heldout_n)
