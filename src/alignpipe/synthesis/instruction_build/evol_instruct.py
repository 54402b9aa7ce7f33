"""Evol-Instruct (Xu et al., WizardLM, arXiv 2304.12244): make instructions more complex, or new, by asking the
model to rewrite them, round after round, and keep only the evolutions that survive the elimination rules.

Each round, every instruction in the pool is evolved by one operation drawn uniformly from `operations`:

- in depth (a harder version of the same instruction; at most 10-20 words longer): `constraints` (add a
  constraint or requirement), `deepen` (ask about the topic in more depth and breadth), `concretize` (replace
  general concepts with specific ones), `reasoning` (ask explicitly for several reasoning steps),
  `complicate_input` (write a concrete input into it: a table, list, JSON object or code snippet);
- in breadth (`breadth`): a new instruction of the same domain on a rarer subject, of similar length and
  difficulty.

The generator's output is the evolved instruction (stripped, matched quotes removed); survivors of the
instruction rules are answered by the generator. Elimination rules, the first that applies is counted:

1. `copied_prompt`: the evolved instruction copies words of the evolving prompt: "#Given Prompt#",
   "#Rewritten Prompt#", "given prompt", "rewritten prompt" (and "created prompt", the breadth prompt's marker),
   or six words in a row of the evolving prompts' own text (small models echo their instructions: "You are
   turning an instruction into a harder version...");
2. `no_gain`: the evolution gives no information gain over the original. Judged by a simple check, not by the
   generator (a 135M model's yes/no would be noise): the evolved text equals the original (case and whitespace
   ignored), or every content word of it (lower-cased alphanumeric tokens that are not stop words) already
   occurs in the original (an empty evolution included);
3. `empty_response` / `failed`: no response (empty after stripping, or the backend failed);
4. `sorry_response`: the response says "sorry" and has fewer than `sorry_max_words` (80) words: the evolved
   instruction was too hard to answer;
5. `only_stopwords`: the response holds nothing but punctuation and stop words;
6. `short_response`: the response has fewer than `min_response_words` words.

A failed evolution is counted under its rule and the original stays in the pool for the next round; a
successful one replaces it there and becomes a dataset row. The dataset is every successful evolution of every
round, plus (`include_seeds`) the starting instructions with their own responses, as WizardLM merges all
generations.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from alignpipe.records import Prompt
from alignpipe.synthesis.generators import Generator
from alignpipe.synthesis.instruction_build.common import Log, SeedTask, answer, chat_row
from alignpipe.synthesis.instruction_build.rouge_filter import normalize

DEPTH_TEMPLATE = (
    "You are turning an instruction for an AI assistant into a harder version of itself. The harder version must "
    "still make sense, be answerable by a person, and keep any table, code or data the instruction contains. "
    "{method} Make it no more than 10 to 20 words longer. Do not answer it; reply with the new version only.\n\n"
    "#Given Prompt#:\n{instruction}\n\n#Rewritten Prompt#:\n"
)
DEPTH_METHODS = {
    "constraints": "Do it by adding one more constraint or requirement that an answer has to meet.",
    "deepen": "Do it by asking about its topic in more depth and breadth.",
    "concretize": "Do it by replacing general concepts in it with more specific ones.",
    "reasoning": "Do it by making it ask explicitly for several steps of reasoning, if a few simple steps would "
                 "solve it now.",
    "complicate_input": "Do it by writing a concrete input into it for the task to work on, such as a short "
                        "table, a list, a JSON object or a code snippet.",
}
BREADTH_TEMPLATE = (
    "You are inventing a new instruction for an AI assistant, taking the instruction below as inspiration. The new "
    "one should belong to the same domain but be about a rarer, less common subject, be about as long and as hard, "
    "and be answerable by a person. Reply with the new instruction only.\n\n"
    "#Given Prompt#:\n{instruction}\n\n#Created Prompt#:\n"
)
COPY_MARKERS = ("#given prompt#", "#rewritten prompt#", "given prompt", "rewritten prompt", "created prompt")
ECHO_WORDS = 6  # this many words in a row of the evolving prompts' own text is a copy

STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both but
by can could did do does doing down during each few for from further had has have having he her here hers herself
him himself his how i if in into is it its itself just me more most my myself no nor not now of off on once only or
other our ours ourselves out over own same she should so some such than that the their theirs them themselves then
there these they this those through to too under until up very was we were what when where which while who whom why
will with would you your yours yourself yourselves also may might must shall s t ll ve re d m let lets ok okay
""".split())
_WORD = re.compile(r"[a-z0-9]+")
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "`": "`"}


def _ngrams(text: str, n: int = ECHO_WORDS) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


# the word 6-grams of the evolving prompts without the instruction they carry
_PROMPT_NGRAMS = set().union(*(_ngrams(part) for template in (DEPTH_TEMPLATE, BREADTH_TEMPLATE)
                               for part in template.split("{instruction}")[0].split("{method}")),
                             *(_ngrams(method) for method in DEPTH_METHODS.values()))


def evolution_prompt(operation: str, instruction: str) -> str:
    if operation == "breadth":
        return BREADTH_TEMPLATE.format(instruction=instruction)
    return DEPTH_TEMPLATE.format(method=DEPTH_METHODS[operation], instruction=instruction)


def clean_evolved(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in STOPWORDS}


def instruction_failure(original: str, evolved: str) -> str | None:
    """Rules 1-2 of the module docstring on an evolved instruction (None: it passes)."""
    if any(marker in evolved.lower() for marker in COPY_MARKERS) or _ngrams(evolved) & _PROMPT_NGRAMS:
        return "copied_prompt"
    if normalize(evolved) == normalize(original) or content_words(evolved) <= content_words(original):
        return "no_gain"
    return None


def response_failure(response: str | None, min_words: int = 3, sorry_max_words: int = 80) -> str | None:
    """Rules 3-6 of the module docstring on the response to an evolved instruction (None: it passes)."""
    if response is None or not response.strip():
        return "empty_response"
    words = response.split()
    if "sorry" in response.lower() and len(words) < sorry_max_words:
        return "sorry_response"
    if not content_words(response):
        return "only_stopwords"
    if len(words) < min_words:
        return "short_response"
    return None


REASONS = ("copied_prompt", "no_gain", "failed", "empty_response", "sorry_response", "only_stopwords",
           "short_response")


@dataclass
class _Item:
    id: str
    instruction: str


@dataclass
class EvolInstructResult:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    decisions: list[dict[str, Any]]  # every evolution and its fate


def evol_instruct(generator: Generator, recipe: Any, seeds: list[SeedTask], log: Log = lambda _: None,
                  ) -> EvolInstructResult:
    """Run Evol-Instruct with `generator` under `recipe` (an `EvolInstructRecipe`) from `seeds`."""
    rng = random.Random(recipe.seed)
    start = seeds[: recipe.num_instructions] if recipe.num_instructions else list(seeds)
    pool = [_Item(s.id, s.instruction) for s in start]
    rows = [chat_row(s.id, s.instruction, s.response, {"source": "seed", "round": 0}) for s in start
            if recipe.include_seeds and s.response.strip()]
    elim = recipe.elimination
    totals: Counter[str] = Counter(dict.fromkeys(REASONS, 0))
    rounds, decisions = [], []
    calls = responses_asked = truncated = 0
    started = time.monotonic()
    for r in range(1, recipe.rounds + 1):
        budget = len(pool) if recipe.max_calls is None else min(len(pool), recipe.max_calls - calls)
        if budget <= 0:
            log(f"round {r}: max_calls ({recipe.max_calls}) reached, stopping")
            break
        indices = list(range(budget))
        ops = [rng.choice(recipe.operations) for _ in indices]
        prompts = [Prompt(id=f"e{r}-{i}", prompt=evolution_prompt(op, pool[i].instruction))
                   for i, op in zip(indices, ops, strict=True)]
        s = recipe.evolution
        candidates = generator.sample(prompts, 1, temperature=s.temperature, top_p=s.top_p,
                                      max_new_tokens=s.max_new_tokens, seed=recipe.seed * 100_003 + r,
                                      source={"source": "evol_instruct", "stage": "evolution", "round": r},
                                      description=f"evolution (round {r})")
        calls += len(prompts)
        by_prompt = {c.prompt_id: c for c in candidates}
        fates: dict[int, str] = {}
        evolved: dict[int, str] = {}
        for i, p in zip(indices, prompts, strict=True):
            c = by_prompt.get(p.id)
            if c is None or "error" in c.source:
                fates[i] = "failed"
                continue
            evolved[i] = clean_evolved(c.completion)
            reason = instruction_failure(pool[i].instruction, evolved[i])
            if reason:
                fates[i] = reason
        to_answer = [i for i in indices if i not in fates]
        answers, counts = answer(generator, [evolved[i] for i in to_answer], recipe.responses,
                                 recipe.seed * 100_003 + r, {"source": "evol_instruct", "stage": "responses",
                                                              "round": r}, description=f"responses (round {r})")
        responses_asked += len(to_answer)
        truncated += counts.get("truncated", 0)
        for i, response in zip(to_answer, answers, strict=True):
            reason = "failed" if response is None else \
                response_failure(response, elim.min_response_words, elim.sorry_max_words)
            if reason:
                fates[i] = reason
                continue
            fates[i] = "kept"
            row_id = f"evol-r{r}-{len(rows) + 1:05d}"
            rows.append(chat_row(row_id, evolved[i], response,
                                 {"source": "evol_instruct", "round": r, "operation": ops[i],
                                  "parent": pool[i].id}))
        failed_here: Counter[str] = Counter()
        for i in indices:
            decisions.append({"round": r, "operation": ops[i], "original": pool[i].instruction,
                              "evolved": evolved.get(i), "fate": fates[i]})
            if fates[i] == "kept":
                pool[i] = _Item(f"{pool[i].id}>r{r}", evolved[i])
            else:
                failed_here[fates[i]] += 1
        totals.update(failed_here)
        kept = sum(1 for i in indices if fates[i] == "kept")
        rounds.append({"round": r, "evolved": len(indices), "kept": kept, "failed": dict(failed_here),
                       "operations": dict(Counter(ops))})
        log(f"round {r}: {len(indices)} evolutions, {kept} kept, failed: "
            + (", ".join(f"{k} {v}" for k, v in failed_here.items()) or "none"))
    attempted = sum(x["evolved"] for x in rounds)
    summary = {
        "build": "evol_instruct",
        "seed_tasks": len(start),
        "calls": {"evolutions": calls, "responses": responses_asked},
        "generated": attempted,  # evolutions attempted
        "accepted": attempted - sum(totals.values()),
        "rejected": dict(totals),
        "truncated_responses": truncated,
        "seeds_in_dataset": sum(1 for row in rows if row["meta"]["source"] == "seed"),
        "kept": len(rows),  # rows in instructions.jsonl
        "rounds": rounds,
        "seconds": {"evolution": round(time.monotonic() - started, 1)},
    }
    return EvolInstructResult(rows=rows, summary=summary, decisions=decisions)
