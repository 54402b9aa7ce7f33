"""Evaluation protocols that the held-out step runs on any task (`heldout.protocols`, issue 13 item 6), on the
round-0 policy and on the final one, each answer greedy and cached beside the run:

- `ifeval`: instruction following with verifiable constraints (the built-in prompts of `data/ifeval.py`):
  prompt-level and instruction-level accuracy, per constraint kind;
- `safety`: harmful requests (the opening human turn of hh-rlhf's red-team dialogues at `heldout.safety_path`,
  the first `safety_n` single-turn ones), judged by `heldout.safety_judge` (default `refusal`, 1 = declined): the
  refusal rate;
- `utility` is the judged win rate of the final policy against round 0 on the task's held-out prompts, which
  the loop computes (`heldout-winrate.json`); naming it here asks for it on tasks that have another metric too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignpipe.records import Candidate, Prompt


def safety_prompts(path: str, n: int) -> list[Prompt]:
    """The first `n` single-turn requests of a preference file's dialogues (hh-rlhf's harmless split: red-team
    openings), in file order."""
    from alignpipe.data.pairs import load_pairs

    out, seen = [], set()
    for pair in load_pairs(path):
        p = pair.prompt
        turns = p.meta.get("messages") or [{"role": "user", "content": p.prompt}]
        if len(turns) != 1 or p.prompt in seen:
            continue
        seen.add(p.prompt)
        out.append(Prompt(id=f"safety-{len(out)}", prompt=p.prompt, task="chat"))
        if len(out) == n:
            break
    return out


def _answers(model, tokenizer, prompts: list[Prompt], recipe, path: Path, fingerprint: str,  # noqa: ANN001
             name: str, label: str) -> list[Candidate]:
    from alignpipe.stages import cached_stage
    from alignpipe.synthesis.transformers_backend import generate

    h = recipe.heldout
    return cached_stage(path / f"eval-{label}-{name}-candidates.parquet", fingerprint, Candidate,
                        lambda: generate(model, tokenizer, prompts, 1, 0.0, 1.0, h.protocol_max_new_tokens,
                                         h.batch_size, recipe.seed, {"eval": label, "protocol": name},
                                         f"{name} ({label})"))


def run_protocols(model, tokenizer, recipe, path: Path, fingerprint: str, label: str,  # noqa: ANN001
                  resolve_judge) -> dict[str, Any]:  # noqa: ANN001
    """Each protocol of `recipe.heldout.protocols` (but `utility`) on `model`; `resolve_judge(spec)` builds judges."""
    from alignpipe.data.ifeval import ifeval_scores, load_ifeval_prompts
    from alignpipe.evaluation import judge_candidates
    from alignpipe.instantiation import score_of

    h, out = recipe.heldout, {}
    if "ifeval" in h.protocols:
        prompts = load_ifeval_prompts()
        answers = _answers(model, tokenizer, prompts, recipe, path, fingerprint, "ifeval", label)
        out["ifeval"] = ifeval_scores(prompts, [c.completion for c in answers])
    if "safety" in h.protocols:
        prompts = safety_prompts(h.safety_path, h.safety_n)
        answers = _answers(model, tokenizer, prompts, recipe, path, fingerprint, "safety", label)
        judgments = judge_candidates(resolve_judge(h.safety_judge), prompts, answers)
        ok = [j for j in judgments if j.status == "ok"]
        out["safety"] = {"refusal_rate": sum(score_of(j) for j in ok) / max(len(ok), 1), "n": len(ok),
                         "not_ok": len(judgments) - len(ok), "judge": h.safety_judge}
    return out
