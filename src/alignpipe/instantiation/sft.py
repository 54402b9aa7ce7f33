"""Demonstrations for instruction tuning (`instantiation.kind: sft`): the round's candidates that pass the judge.

One rule covers the three ways the issue's data is built: gold responses of a dataset (judge `accept`: every
one is kept), a teacher's responses (distillation) and the policy's own samples kept only when a verifier
accepts them (rejection-sampling fine-tuning / STaR, arXiv 2203.14465 and 2308.01825): a candidate becomes a
demonstration when its judgment is ok and its score is at least `label_threshold` (the same binarization
that labels KTO points desirable). Identical completions of one prompt are kept once (RFT keeps distinct
reasoning paths). The demonstration is the prompt's turns plus the candidate as the last assistant turn.
"""

from __future__ import annotations

from alignpipe.instantiation import BuildStats, _grouped
from alignpipe.records import Candidate, Judgment, Prompt, SftExample


def prompt_turns(prompt: Prompt) -> list[dict[str, str]]:
    """The conversation before the response: a multi-turn prompt's own turns, else its text as one user turn."""
    turns = prompt.meta.get("messages")
    return [dict(t) for t in turns] if turns else [{"role": "user", "content": prompt.prompt}]


def sft_examples(prompts: list[Prompt], candidates: list[Candidate], judgments: list[Judgment],
                 threshold: float = 0.5, dim: str | None = None) -> tuple[list[SftExample], BuildStats]:
    """Per prompt, each distinct candidate scoring >= `threshold` as a demonstration; counts what was left out
    (`extra["below_threshold"]`, `extra["duplicates"]`) and the prompts that kept none (`skipped_margin`)."""
    grouped, not_ok = _grouped(prompts, candidates, judgments, dim)
    stats = BuildStats(prompts=len(grouped), judgments_not_ok=not_ok)
    below = duplicates = 0
    out: list[SftExample] = []
    for prompt, group in grouped:
        seen: set[str] = set()
        kept = 0
        for candidate, score, _ in group:
            if score < threshold:
                below += 1
                continue
            if candidate.completion in seen:
                duplicates += 1
                continue
            seen.add(candidate.completion)
            out.append(SftExample(messages=prompt_turns(prompt) + [{"role": "assistant",
                                                                    "content": candidate.completion}],
                                  prompt_id=prompt.id, score=score, truncated=candidate.truncated))
            kept += 1
        stats.skipped_margin += kept == 0
    stats.examples = len(out)
    stats.extra.update(below_threshold=below, duplicates=duplicates)
    return out, stats
