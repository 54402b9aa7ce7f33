"""Judge bias control: both-order pairwise judging (position bias) and the cross-family guard
(self-preference). Length control lives in `length_control.py`.

Both orders (MT-Bench's conservative rule, arXiv 2306.05685): every pair is judged as (A, B) and as
(B, A); the swapped verdict is mapped back to the original order. The pair is *consistent* when both
orders agree (A both times, B both times, or tie both times). An inconsistent pair is resolved by
`on_inconsistent`:

- `"tie"` (default, MT-Bench): preference "tie", status ok;
- `"drop"`: status "invalid", reason "inconsistent" (the pair yields no training signal);
- `"first"`: the verdict of the original (A, B) order is kept.

If either order has no verdict (invalid or error), the pair has none either: status "error" when an
order errored, else "invalid", with the reason naming the order. `raw` is JSON holding both orders'
verdicts and raw answers plus `consistent` (true / false / null when undecidable); `consistency_rate`
reads it back from judgments on disk.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import PurePath

from alignpipe import AlignpipeError
from alignpipe.evaluation.base import PairwiseJudge
from alignpipe.records import Candidate, Judgment, Prompt

POLICIES = ("tie", "drop", "first")
_SWAP = {"first": "second", "second": "first", "tie": "tie"}


class BothOrdersJudge:
    """A pairwise judge that asks `pairwise_judge` about both orders of every pair (one batched call)."""

    def __init__(self, pairwise_judge: PairwiseJudge, on_inconsistent: str = "tie", name: str | None = None):
        if on_inconsistent not in POLICIES:
            raise ValueError(f"on_inconsistent must be one of {POLICIES}, not {on_inconsistent!r}")
        self.inner = pairwise_judge
        self.on_inconsistent = on_inconsistent
        self.name = name or f"both_orders({pairwise_judge.name})"
        self.stats: Counter[str] = Counter()

    def compare(self, items: list[tuple[Prompt, Candidate, Candidate]]) -> list[Judgment]:
        swapped = [(p, b, a) for p, a, b in items]
        results = self.inner.compare(list(items) + swapped)
        if len(results) != 2 * len(items):
            raise RuntimeError(f"{self.inner.name} returned {len(results)} judgments for {2 * len(items)} pairs")
        n = len(items)
        return [self._combine(p, a, b, ab, ba)
                for (p, a, b), ab, ba in zip(items, results[:n], results[n:], strict=True)]

    def _combine(self, prompt: Prompt, a: Candidate, b: Candidate, ab: Judgment, ba: Judgment) -> Judgment:
        mapped = _SWAP.get(ba.preference) if ba.status == "ok" else None  # type: ignore[arg-type]
        record = {
            "policy": self.on_inconsistent,
            "ab": {"preference": ab.preference, "status": ab.status, "reason": ab.reason, "raw": ab.raw},
            "ba": {"preference": ba.preference, "mapped": mapped, "status": ba.status, "reason": ba.reason,
                   "raw": ba.raw},
        }
        j = Judgment(prompt_id=prompt.id, candidate_ids=[a.id, b.id], judge=self.name)
        failed = [(order, x) for order, x in (("ab", ab), ("ba", ba)) if x.status != "ok" or x.preference is None]
        if failed:
            record["consistent"] = None
            j.status = "error" if any(x.status == "error" for _, x in failed) else "invalid"
            j.reason = "; ".join(f"order {order}: {x.status}: {x.reason}" for order, x in failed)
            self.stats["undecided"] += 1
        elif ab.preference == mapped:
            record["consistent"] = True
            j.preference, j.rationale = ab.preference, ab.rationale
            self.stats["consistent"] += 1
        else:
            record["consistent"] = False
            self.stats["inconsistent"] += 1
            if self.on_inconsistent == "drop":
                j.status, j.reason = "invalid", "inconsistent"
            else:
                j.preference = "tie" if self.on_inconsistent == "tie" else ab.preference
                j.rationale = ab.rationale
                j.reason = f"inconsistent (resolved: {self.on_inconsistent})"
        j.raw = json.dumps(record)
        return j

    @property
    def consistency(self) -> float | None:
        """Share of decidable pairs (both orders gave a verdict) judged consistently, across calls."""
        n = self.stats["consistent"] + self.stats["inconsistent"]
        return self.stats["consistent"] / n if n else None


def consistency_rate(judgments: list[Judgment]) -> float | None:
    """Position consistency over `BothOrdersJudge` judgments (read from `raw`); None if none decidable."""
    flags = []
    for j in judgments:
        try:
            flag = json.loads(j.raw).get("consistent")
        except (ValueError, AttributeError):
            continue
        if isinstance(flag, bool):
            flags.append(flag)
    return sum(flags) / len(flags) if flags else None


# ---------------------------------------------------------------- self-preference guard

# Organisation / packaging words that may precede the model name (`meta-llama`, `Meta-Llama-3`).
_VENDORS = {"meta", "microsoft", "google", "mistralai", "huggingfacetb", "hf", "nvidia", "ibm", "allenai",
            "tiiuae", "openai", "anthropic", "unsloth", "thebloke", "lmstudio", "bartowski", "models", "model"}
# Spellings of one lineage: CodeLlama and TinyLlama are Llama; QwQ is Qwen; Mixtral is Mistral.
_ALIASES = {"codellama": "llama", "tinyllama": "llama", "qwq": "qwen", "mixtral": "mistral", "codestral": "mistral",
            "codegemma": "gemma", "chatgpt": "gpt"}


def model_family(name: str) -> str:
    """The model family of a model name, id or path.

    Rule: lowercase; keep the last path component (`org/name` and directories); drop a file suffix such as
    `.gguf`; split on `-`, `_`, `.` and spaces; skip leading vendor words (`meta`, `google`, ...); the family
    is the leading letters of the first remaining token, so versions and sizes do not count
    (`Qwen2.5-7B-Instruct` -> `qwen`, `SmolLM2-135M-Instruct` -> `smollm`, `meta-llama/Llama-3.1-8B` ->
    `llama`); known sibling spellings are merged (`codellama`, `tinyllama` -> `llama`; `qwq` -> `qwen`;
    `mixtral` -> `mistral`). Successive versions of one model share a family on purpose: self-preference
    follows the lineage (same developer, overlapping training data), not the version number.
    """
    base = PurePath(name.strip().rstrip("/\\").replace("\\", "/")).name.lower()
    base = re.sub(r"\.(gguf|bin|safetensors|pt|onnx)$", "", base)
    tokens = [t for t in re.split(r"[-_.\s]+", base) if t]
    while len(tokens) > 1 and tokens[0] in _VENDORS:
        tokens.pop(0)
    if not tokens:
        raise ValueError(f"cannot tell the model family of {name!r}")
    letters = re.match(r"[a-z]*", tokens[0]).group(0)  # type: ignore[union-attr]
    family = letters or tokens[0]
    return _ALIASES.get(family, family)


class SelfPreferenceError(AlignpipeError):
    """The judge and the policy it judges come from the same model family."""


def check_cross_family(judge_backend_name: str, policy_name: str, required: bool = True) -> tuple[str, str]:
    """Raise `SelfPreferenceError` when a cross-family judge is `required` and the judge's model family
    (see `model_family`) equals the policy's. Returns both families."""
    judge_family, policy_family = model_family(judge_backend_name), model_family(policy_name)
    if required and judge_family == policy_family:
        raise SelfPreferenceError(
            f"judge {judge_backend_name!r} and policy {policy_name!r} are both of model family "
            f"{judge_family!r}; a cross-family judge is required (LLM judges prefer their own family's "
            f"outputs). Use a judge from another family, or turn the cross-family requirement off."
        )
    return judge_family, policy_family
