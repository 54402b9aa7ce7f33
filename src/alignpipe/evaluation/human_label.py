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


# Provenance as the label (SPIN, arXiv 2401.01335; distillation): a reference response is preferred to the
# policy's own sample. Gold, teacher and a dataset's chosen response score 1; the policy's samples and a
# dataset's rejected response score 0.
_PROVENANCE_SCORES = {"gold": 1.0, "teacher": 1.0, "policy": 0.0}


def provenance(prompt: Prompt, candidate: Candidate) -> Judgment:
    source = candidate.source.get("source")
    base = dict(prompt_id=prompt.id, candidate_ids=[candidate.id], judge="provenance", raw=str(source))
    if source == "offline" and candidate.source.get("label") in _LABEL_SCORES:
        return Judgment(**base, scores={"reference": _LABEL_SCORES[candidate.source["label"]]})
    if source not in _PROVENANCE_SCORES:
        return Judgment(**base, status="invalid", reason=f"no known source on the candidate (got {source!r})")
    return Judgment(**base, scores={"reference": _PROVENANCE_SCORES[source]})
