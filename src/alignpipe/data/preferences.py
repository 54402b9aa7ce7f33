"""Preference data as prompts that carry their own labelled responses (offline recipes).

Each `Prompt.meta["responses"]` is `[{"completion": chosen, "label": "chosen"}, {"completion": rejected,
"label": "rejected"}]`; the offline synthesis backend turns them into candidates and the `human_label`
judge scores them from the label, so the usual instantiation builds the dataset's own pairs.
"""

from __future__ import annotations

import random

from alignpipe import AlignpipeError
from alignpipe.data import TaskData
from alignpipe.data.pairs import load_pairs
from alignpipe.records import Prompt


def load(task, heldout_n: int) -> TaskData:  # noqa: ANN001 - config.PreferenceTask
    prompts: list[Prompt] = []
    for pair in load_pairs(task.path, task.format, task.limit):
        p = pair.prompt
        if task.max_prompt_chars is not None and len(p.prompt) > task.max_prompt_chars:
            continue  # online recipes on a small CPU budget: every sample and judgment re-reads the prompt
        p.meta["responses"] = [{"completion": pair.chosen.completion, "label": "chosen"},
                               {"completion": pair.rejected.completion, "label": "rejected"}]
        prompts.append(p)
    if not prompts:
        raise AlignpipeError(f"{task.path}: no prompt of at most {task.max_prompt_chars} characters "
                             "(task.max_prompt_chars)")
    random.Random(task.seed).shuffle(prompts)
    n_held = min(heldout_n, max(1, int(len(prompts) * task.heldout_fraction)))
    return TaskData(train=prompts[n_held:], heldout=prompts[:n_held])
