"""The judge interfaces every evaluator implements, and the generation-backend interface LLM judges use.

- A pointwise judge scores one candidate: `score(items) -> judgments`, one `Judgment` per
  `(Prompt, Candidate)`, with `scores={criterion: value}`.
- A pairwise judge compares two candidates: `compare(items) -> judgments`, one `Judgment` per
  `(Prompt, Candidate, Candidate)`, with `candidate_ids=[first.id, second.id]` and
  `preference in {"first", "second", "tie"}` (None when status is not ok).
- A text backend turns chat conversations into completions: `complete(conversations, ...) -> texts`.

Judges work on lists so that backends can batch; a failure on one item is that item's
`status="error"` / `"invalid"` Judgment, never an exception that loses the others.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from alignpipe.records import Candidate, Judgment, Prompt

Message = dict[str, str]  # {"role": ..., "content": ...}


@runtime_checkable
class PointwiseJudge(Protocol):
    name: str

    def score(self, items: list[tuple[Prompt, Candidate]]) -> list[Judgment]: ...


@runtime_checkable
class PairwiseJudge(Protocol):
    name: str

    def compare(self, items: list[tuple[Prompt, Candidate, Candidate]]) -> list[Judgment]: ...


@runtime_checkable
class TextBackend(Protocol):
    """Chat completion: one text per conversation, greedy unless temperature > 0."""

    name: str  # model identity, e.g. for the self-preference (model family) check

    def complete(self, conversations: list[list[Message]], max_new_tokens: int = 256,
                 temperature: float = 0.0) -> list[str]: ...
