"""How each instance type is laid out as token rows, and which named tensors it hands to objectives.

- pair:  rows [chosen, rejected] per example; a batch is all chosen rows, then all rejected rows.
- point: rows [completion, mismatched completion] per example; the mismatched row pairs the prompt with
         the next example's completion (the KTO reference point z0 reads its log-ratio).
- group: rows = the K completions of the group; a batch is group-major.
- sft:   one row per demonstration: the whole conversation, its mask on every assistant turn (and only there).

`BASE_PROVIDED[kind]` is the set of tensor names built here for that kind; input providers
(`optimization/providers/`) add more; `providers.provided(kind)` is the union, which the recipe loader checks every
objective's inputs against, so a recipe asking for something the examples do not carry fails before any
work starts.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from alignpipe.optimization.batching import encode
from alignpipe.optimization.conversation import encode_conversation
from alignpipe.optimization.logprobs import SequenceLogps
from alignpipe.records import GroupExample, PairExample, PointExample, SftExample

Row = tuple[list[int], list[int]]

BASE_PROVIDED: dict[str, frozenset[str]] = {
    "pair": frozenset({
        "chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths", "ref_chosen_logps",
        "ref_rejected_logps", "margins", "weights", "chosen_token_logps", "rejected_token_logps",
        "ref_chosen_token_logps", "ref_rejected_token_logps", "chosen_mask", "rejected_mask",
    }),
    "point": frozenset({"logps", "lengths", "ref_logps", "labels", "scores", "weights", "kl_logps", "ref_kl_logps"}),
    "group": frozenset({"token_logps", "old_token_logps", "ref_token_logps", "completion_mask", "rewards",
                        "logps", "lengths", "ref_logps"}),
    # `chosen_*` too: the demonstration is what the `sft` loss (written for the chosen side of pairs) reads
    "sft": frozenset({"logps", "lengths", "token_logps", "completion_mask", "weights", "chosen_logps",
                      "chosen_lengths"}),
}

def kind_of(example: object) -> str:
    return {PairExample: "pair", PointExample: "point", GroupExample: "group", SftExample: "sft"}[type(example)]


def encode_demonstration(tokenizer: PreTrainedTokenizerBase, example: SftExample, max_length: int) -> Row:
    """The demonstration's row; a last turn cut off by max_new_tokens gets no EOS (it never ended)."""
    ids, mask = encode_conversation(tokenizer, example.messages, max_length)
    if example.truncated and ids and ids[-1] == tokenizer.eos_token_id:
        ids, mask = ids[:-1], mask[:-1]
    return ids, mask


class Instances:
    """Tokenised rows of a list of examples of one kind, and the tensors of a batch of them."""

    def __init__(self, examples: list, tokenizer: PreTrainedTokenizerBase, max_length: int):
        self.examples = examples
        self.kind = kind_of(examples[0])

        def enc(prompt: str, completion: str, truncated: bool) -> Row:
            return encode(tokenizer, prompt, completion, truncated, max_length)

        self.rows: list[list[Row]] = []
        for i, ex in enumerate(examples):
            if self.kind == "pair":
                self.rows.append([enc(ex.prompt, ex.chosen, ex.chosen_truncated),
                                  enc(ex.prompt, ex.rejected, ex.rejected_truncated)])
            elif self.kind == "sft":
                self.rows.append([encode_demonstration(tokenizer, ex, max_length)])
            elif self.kind == "point":
                other = examples[(i + 1) % len(examples)]
                self.rows.append([enc(ex.prompt, ex.completion, ex.truncated),
                                  enc(ex.prompt, other.completion, other.truncated)])
            else:
                truncated = ex.truncated or [False] * len(ex.completions)
                self.rows.append([enc(ex.prompt, c, t) for c, t in zip(ex.completions, truncated, strict=True)])
        self._starts = [0]
        for rows in self.rows:
            self._starts.append(self._starts[-1] + len(rows))

    def flat_rows(self) -> list[Row]:
        return [r for rows in self.rows for r in rows]

    def flat_positions(self, indices: list[int]) -> list[int]:
        """Index into flat_rows() of each row of a batch, in batch layout order."""
        if self.kind in ("group", "sft"):
            return [self._starts[i] + k for i in indices for k in range(len(self.rows[i]))]
        return [self._starts[i] for i in indices] + [self._starts[i] + 1 for i in indices]

    def batch_groups(self, indices: list[int]) -> list[list[int]]:
        """The rows of a batch (in `batch_rows` order) that share a prompt, one list per example: what
        `sequence_logps(groups=...)` packs."""
        if self.kind in ("group", "sft"):
            out, at = [], 0
            for i in indices:
                out.append(list(range(at, at + len(self.rows[i]))))
                at += len(self.rows[i])
            return out
        n = len(indices)
        return [[j, n + j] for j in range(n)]

    def flat_groups(self) -> list[list[int]]:
        """`batch_groups` for `flat_rows()`: each example's rows are adjacent there."""
        return [list(range(self._starts[i], self._starts[i + 1])) for i in range(len(self.rows))]

    def batch_rows(self, indices: list[int]) -> list[Row]:
        flat = self.flat_rows()
        return [flat[p] for p in self.flat_positions(indices)]

    def tensors(self, indices: list[int], seq: SequenceLogps, fixed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named tensors of a batch. `fixed` holds precomputed per-token tensors in the batch layout
        (`ref_token_logps`, `old_token_logps`)."""
        exs = [self.examples[i] for i in indices]
        dev = seq.logps.device
        ref_tokens = fixed.get("ref_token_logps")
        ref = (ref_tokens * seq.mask).sum(-1) if ref_tokens is not None else None
        if self.kind == "sft":
            return {"logps": seq.logps, "lengths": seq.lengths, "token_logps": seq.token_logps,
                    "completion_mask": seq.mask, "chosen_logps": seq.logps, "chosen_lengths": seq.lengths,
                    "weights": torch.tensor([e.weight for e in exs], dtype=torch.float32, device=dev)}
        if self.kind == "group":
            if len({len(e.scores) for e in exs}) != 1:
                raise ValueError("all groups of a batch must have the same size")
            t = {"token_logps": seq.token_logps, "completion_mask": seq.mask, "logps": seq.logps,
                 "lengths": seq.lengths,
                 "rewards": torch.tensor([e.scores for e in exs], dtype=torch.float32, device=dev)}
            if ref is not None:
                t["ref_token_logps"], t["ref_logps"] = ref_tokens, ref
            if "old_token_logps" in fixed:
                t["old_token_logps"] = fixed["old_token_logps"]
            return t
        n = len(exs)
        first, second = slice(0, n), slice(n, 2 * n)
        weights = torch.tensor([e.weight for e in exs], dtype=torch.float32, device=dev)
        if self.kind == "point":
            t = {"logps": seq.logps[first], "lengths": seq.lengths[first], "kl_logps": seq.logps[second],
                 "labels": torch.tensor([e.label for e in exs], dtype=torch.bool, device=dev),
                 "scores": torch.tensor([e.score for e in exs], dtype=torch.float32, device=dev), "weights": weights}
            if ref is not None:
                t["ref_logps"], t["ref_kl_logps"] = ref[first], ref[second]
            return t
        t = {
            "chosen_logps": seq.logps[first], "rejected_logps": seq.logps[second],
            "chosen_lengths": seq.lengths[first], "rejected_lengths": seq.lengths[second],
            "chosen_token_logps": seq.token_logps[first], "rejected_token_logps": seq.token_logps[second],
            "chosen_mask": seq.mask[first], "rejected_mask": seq.mask[second],
            "margins": torch.tensor([e.margin for e in exs], dtype=torch.float32, device=dev), "weights": weights,
        }
        if ref is not None:
            t["ref_chosen_logps"], t["ref_rejected_logps"] = ref[first], ref[second]
            t["ref_chosen_token_logps"], t["ref_rejected_token_logps"] = ref_tokens[first], ref_tokens[second]
        return t
