"""The offline source: candidates are the responses a dataset ships with (no generation)."""

from __future__ import annotations

from alignpipe import AlignpipeError
from alignpipe.records import Candidate, Prompt


def offline_candidates(prompts: list[Prompt]) -> list[Candidate]:
    out = []
    for p in prompts:
        responses = p.meta.get("responses")
        if not responses:
            raise AlignpipeError(f"prompt {p.id}: the offline source needs meta['responses'] (a preference task)")
        for k, r in enumerate(responses):
            out.append(Candidate(prompt_id=p.id, id=f"{p.id}/{k}", completion=r["completion"],
                                 source={"offline": True, "label": r.get("label")}))
    return out
