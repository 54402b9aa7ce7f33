"""Self-Instruct (Wang et al., arXiv 2212.10560): grow a pool of instructions from a few seed tasks with the model
itself, then answer each.

Steps (the paper's, simplified where noted):

1. The pool starts as the seed tasks' instructions (`common.load_seed_tasks`).
2. A generation prompt shows `seed_examples` seed instructions plus `generated_examples` instructions generated
   so far (fewer while there are fewer; the paper's 6 + 2), shuffled and numbered, and asks for
   `instructions_per_call` more, numbered, one per line. `calls_per_batch` such prompts, each with its own random
   examples, are sampled at once.
3. Each output is parsed into instructions (`parse_instructions`): lines that start with a number marker
   (`3.`, `3)`, `(3)`, `Task 3:`) or a bullet; a leading label (`Task:`, `Instruction:`) and matched quotes are
   removed; text on lines without a marker is ignored (small models tend to answer a task there, or chat). When
   the output was cut by `max_new_tokens`, its last item is dropped if it is on the last line (`cut_off`), as the
   paper drops the last instruction of a length-stopped completion.
4. The parsed instructions go through the filters of `rouge_filter.py` (ROUGE-L F < 0.7 against every pool
   instruction, length, blocklist, first character, exact duplicates); kept ones join the pool at once.
5. Repeat until `num_instructions` were kept or `max_calls` prompts were sent. After the first batch, a batch is
   sized by the yield so far (kept per call) to 1.5 times what is still missing, between a quarter of
   `calls_per_batch` and all of it; the kept instructions past the target are dropped (`surplus`).
6. Each kept instruction is answered by the generator (`responses` sampling); an empty response drops the
   instruction (`responses_dropped.empty`), as does a backend failure (`responses_dropped.failed`).

Simplified from the paper: instructions are self-contained (an input is written into the instruction, as in the
built-in seeds), so there is no classification-task identification and no separate input-first / output-first
instance generation; a response is generated for the instruction directly.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from alignpipe.records import Prompt
from alignpipe.synthesis.generators import Generator, drop_failed
from alignpipe.synthesis.instruction_build.common import Log, SeedTask, answer, chat_row
from alignpipe.synthesis.instruction_build.rouge_filter import REASONS, RougePool, filter_instructions

# a list item's marker: "3.", "3)", "(3)", "3:", "Task 3:", "#3.", "**3.**" followed by a space or the line's end
_NUMBERED = re.compile(r"^\s*(?:\*\*)?(?:(?:task|instruction)\s*#?\s*)?#?\(?\d{1,3}\s*[.):\]](?:\*\*)?(?:\s+|$)(.*)$",
                       re.IGNORECASE)
_BULLET = re.compile(r"^\s*[-*\u2022]\s+(.*)$")
_LABEL = re.compile(r"^(?:\*\*)?(?:new\s+)?(?:task|instruction)(?:\s*\d{1,3})?\s*(?:\*\*)?\s*[:\-]\s*(?:\*\*)?\s*",
                    re.IGNORECASE)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "`": "`"}


def instruction_prompt(examples: list[str], count: int) -> str:
    """The generation prompt: the examples numbered 1..n, then a request for `count` more."""
    listed = "\n".join(f"{i}. {text}" for i, text in enumerate(examples, start=1))
    first, last = len(examples) + 1, len(examples) + count
    return (f"Here are some tasks that people ask an AI assistant to do:\n\n{listed}\n\n"
            f"Write {count} more tasks like these, each about something different. Write only the tasks, "
            f"numbered {first} to {last}, one per line. Do not answer them.")


def _unbold(text: str) -> str:
    text = text.strip()
    if text.startswith("**"):
        text = text[2:].replace("**", "", 1) if text.count("**") >= 2 else text[2:]
    return text.removesuffix("**").strip()


def _item(line: str) -> str | None:
    """The text of a list item line (markers, nested markers, labels, bold and matched quotes removed)."""
    match = _NUMBERED.match(line) or _BULLET.match(line)
    if match is None:
        return None
    body = match.group(1)
    while (inner := _NUMBERED.match(body) or _BULLET.match(body)) is not None:  # "1. 1. text", "1. - text"
        body = inner.group(1)
    body = _LABEL.sub("", _unbold(body))
    body = _unbold(body)
    if len(body) >= 2 and _QUOTES.get(body[0]) == body[-1]:
        body = body[1:-1].strip()
    return body


def parse_instructions(text: str, truncated: bool = False) -> tuple[list[str], int]:
    """(instructions listed in a generator output, 1 if the last was dropped as cut off else 0); see the module
    docstring for the rules."""
    lines = text.splitlines()
    items: list[tuple[int, str]] = []
    for n, line in enumerate(lines):
        body = _item(line)
        if body:
            items.append((n, body))
    last_line = max((n for n, line in enumerate(lines) if line.strip()), default=-1)
    cut_off = int(truncated and bool(items) and items[-1][0] == last_line)
    return [body for _, body in items[: len(items) - cut_off]], cut_off


@dataclass
class SelfInstructResult:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    decisions: list[dict[str, Any]] = field(default_factory=list)  # every parsed instruction and its fate


def _batch_size(recipe: Any, kept: int, calls: int) -> int:
    """The next batch's calls: what the yield so far says is missing, half as much again (the yield falls as the
    pool fills, and a surplus costs only its generation), at least a quarter batch (small batches are slow)."""
    missing = recipe.num_instructions - kept
    left = recipe.max_calls - calls
    if calls == 0:
        return min(recipe.calls_per_batch, left)
    rate = max(kept / calls, 0.25)  # kept per call so far (a floor, so a slow start cannot stall)
    wanted = max(math.ceil(1.5 * missing / rate), recipe.calls_per_batch // 4)
    return max(1, min(recipe.calls_per_batch, left, wanted))


def self_instruct(generator: Generator, recipe: Any, seeds: list[SeedTask], log: Log = lambda _: None,
                  ) -> SelfInstructResult:
    """Run Self-Instruct with `generator` under `recipe` (a `SelfInstructRecipe`) from `seeds`."""
    rng = random.Random(recipe.seed)
    seed_texts = [s.instruction for s in seeds]
    pool = RougePool(seed_texts)
    flt = recipe.filter
    generated: list[dict[str, Any]] = []  # kept instructions: text, call, most similar pool text and its score
    rejected: Counter[str] = Counter(dict.fromkeys((*REASONS, "cut_off"), 0))  # every reason, 0s too
    decisions: list[dict[str, Any]] = []
    calls = parsed = failed_calls = empty_calls = batch = 0
    started = time.monotonic()
    while len(generated) < recipe.num_instructions and calls < recipe.max_calls:
        size = _batch_size(recipe, len(generated), calls)
        prompts = []
        for i in range(size):
            n_gen = min(recipe.generated_examples, len(generated))
            n_seed = min(recipe.seed_examples + recipe.generated_examples - n_gen, len(seed_texts))
            examples = rng.sample(seed_texts, n_seed) + [g["instruction"] for g in rng.sample(generated, n_gen)]
            rng.shuffle(examples)
            prompts.append(Prompt(id=f"call-{calls + i}", prompt=instruction_prompt(examples,
                                                                                   recipe.instructions_per_call)))
        s = recipe.instructions
        candidates = generator.sample(prompts, 1, temperature=s.temperature, top_p=s.top_p,
                                      max_new_tokens=s.max_new_tokens, seed=recipe.seed * 100_003 + batch,
                                      source={"source": "self_instruct", "stage": "instructions"},
                                      description=f"instructions (batch {batch + 1})")
        produced, failed = drop_failed(candidates)
        failed_calls += failed
        kept_before = len(generated)
        for c in produced:
            items, cut_off = parse_instructions(c.completion, c.truncated)
            parsed += len(items) + cut_off
            rejected["cut_off"] += cut_off
            empty_calls += not items
            result = filter_instructions(items, pool, threshold=flt.rouge_threshold, min_words=flt.min_words,
                                         max_words=flt.max_words, blocklist=flt.blocklist)
            rejected.update(result.rejected)
            for text, fate, score, similar in result.decisions:
                decisions.append({"instruction": text, "fate": fate, "rouge_l": round(score, 4),
                                  "most_similar": similar, "call": c.prompt_id})
                if fate == "kept":
                    generated.append({"instruction": text, "call": c.prompt_id, "rouge_l": round(score, 4),
                                      "most_similar": similar})
        calls += size
        batch += 1
        log(f"batch {batch}: {size} calls, {len(generated) - kept_before} instructions kept, "
            f"{min(len(generated), recipe.num_instructions)}/{recipe.num_instructions} in all ({calls} calls)")
    surplus = max(0, len(generated) - recipe.num_instructions)
    generated = generated[: recipe.num_instructions]

    texts = [g["instruction"] for g in generated]
    answering = time.monotonic()
    responses, dropped = answer(generator, texts, recipe.responses, recipe.seed,
                                {"source": "self_instruct", "stage": "responses"})
    rows = []
    for g, response in zip(generated, responses, strict=True):
        if response:
            meta = {"source": "self_instruct", "call": g["call"], "rouge_l": g["rouge_l"],
                    "most_similar": g["most_similar"]}
            rows.append(chat_row(f"self-instruct-{len(rows) + 1:05d}", g["instruction"], response, meta))
    accepted = parsed - sum(rejected.values())
    summary = {
        "build": "self_instruct",
        "seed_tasks": len(seeds),
        "calls": {"instructions": calls, "responses": len(texts), "failed": failed_calls,
                  "without_instructions": empty_calls},
        "generated": parsed,  # instructions parsed from the outputs (cut-off ones included)
        "accepted": accepted,  # passed every filter
        "rejected": dict(rejected),
        "surplus": surplus,  # accepted past num_instructions, not answered
        "responses_dropped": {k: v for k, v in dropped.items() if k != "truncated"},
        "truncated_responses": dropped.get("truncated", 0),
        "kept": len(rows),  # rows in instructions.jsonl
        "target": recipe.num_instructions,
        "seconds": {"instructions": round(answering - started, 1),
                    "responses": round(time.monotonic() - answering, 1)},
    }
    return SelfInstructResult(rows=rows, summary=summary, decisions=decisions)
