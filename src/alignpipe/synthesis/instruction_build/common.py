"""What both builds share: seed tasks, answering instructions with the generator, and the output rows."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpipe.records import Prompt
from alignpipe.synthesis.generators import Generator, drop_failed

BUILTIN_SEEDS = Path(__file__).with_name("seed_tasks.jsonl")
Log = Callable[[str], None]


@dataclass
class SeedTask:
    id: str
    instruction: str  # one line: what in-context examples and the ROUGE pool hold
    response: str


def one_line(text: str) -> str:
    return " ".join(text.split())


def load_seed_tasks(path: str | Path | None = None) -> list[SeedTask]:
    """The seed tasks: an instruction file in any format the instruction loader reads (Alpaca, ShareGPT, chat
    `messages`, prompt/completion), None = the built-in set (`seed_tasks.jsonl`, 32 tasks written for this
    package). A multi-turn row contributes its last user turn and the response to it."""
    from alignpipe.data.instructions import read_prompts

    prompts = read_prompts(path or BUILTIN_SEEDS)
    return [SeedTask(id=p.id, instruction=one_line(p.prompt), response=p.meta["response"]) for p in prompts]


def chat_row(row_id: str, instruction: str, response: str, meta: dict[str, Any]) -> dict[str, Any]:
    """One dataset row in the chat `messages` format the instruction loader reads (`meta`: provenance)."""
    return {"id": row_id, "messages": [{"role": "user", "content": instruction},
                                       {"role": "assistant", "content": response}], "meta": meta}


def answer(generator: Generator, instructions: list[str], sampling: Any, seed: int, source: dict[str, Any],
           description: str = "responses") -> tuple[list[str | None], Counter[str]]:
    """A response per instruction, stripped ("" when empty, None when the backend failed), and the counts of
    `empty`, `failed` and `truncated` (cut by max_new_tokens) responses."""
    counts: Counter[str] = Counter()
    if not instructions:
        return [], counts
    prompts = [Prompt(id=f"r{i}", prompt=text) for i, text in enumerate(instructions)]
    candidates = generator.sample(prompts, 1, temperature=sampling.temperature, top_p=sampling.top_p,
                                  max_new_tokens=sampling.max_new_tokens, seed=seed, source=source,
                                  description=description)
    produced, counts["failed"] = drop_failed(candidates)
    by_prompt = {c.prompt_id: c for c in produced}
    out: list[str | None] = []
    for p in prompts:
        c = by_prompt.get(p.id)
        text = c.completion.strip() if c is not None else None
        if c is not None and not text:
            counts["empty"] += 1
        elif c is not None and c.truncated:
            counts["truncated"] += 1
        out.append(text)
    return out, +counts
