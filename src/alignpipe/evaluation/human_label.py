"""Imported human labels as a judge: a dataset's chosen response scores 1, its rejected one 0."""

from __future__ import annotations

from alignpipe.records import Candidate, Judgment, Prompt

_LABEL_SCORES = {"chosen": 1.0, "rejected": 0.0}


def human_label(prompt: Prompt, candidate: Candidate) -> Judgment:
    label = candidate.source.get("label")
    base = dict(prompt_id=prompt.id, candidate_ids=[candidate.id], judge="human_label", raw=str(label))
    if label not in _LABEL_SCORES:
        return Judgment(**base, status="invalid", reason=f"no human label on the candidate (got {label!r})")
    return Judgment(**base, scores={"preferred": _LABEL_SCORES[label]})
