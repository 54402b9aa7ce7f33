"""The training loop: read it top to bottom.

1. tokenise the round's examples;
2. precompute what stays fixed during the round, once: reference log-probs (the LoRA-disabled base, or
   the policy at the start of the round under full fine-tuning) and, for on-policy groups, the
   old-policy log-probs of the sampler;
3. for each epoch, for each batch: one forward pass over all completions of the batch (chosen and
   rejected, or a whole group, concatenated), the weighted objective list, backward, clip, step.
"""

from __future__ import annotations

import contextlib
import random
from collections import defaultdict
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignpipe.config import OptimizationConfig
from alignpipe.optimization.batching import collate, encode
from alignpipe.optimization.logprobs import sequence_logps
from alignpipe.optimization.objectives import OBJECTIVES, combined_loss
from alignpipe.progress import progress
from alignpipe.records import GroupExample, PairExample

Row = tuple[list[int], list[int]]


def reference_context(model: PreTrainedModel) -> contextlib.AbstractContextManager:
    """The reference policy without a second copy: adapters disabled under LoRA; the model as it is
    (the start-of-round policy, since reference values are precomputed before any step) otherwise."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


@torch.no_grad()
def _completion_logps(model, rows: list[Row], pad_id: int, cfg: OptimizationConfig, desc: str) -> list[torch.Tensor]:  # noqa: ANN001
    """Per row, the log-probs of its completion tokens (a 1-D tensor), computed in batches."""
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths pad little
    values: dict[int, torch.Tensor] = {}
    step = cfg.batch_size * 4
    device = next(model.parameters()).device
    with progress(transient=True) as bar:
        task = bar.add_task(desc, total=len(rows), info="")
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            batch = {k: v.to(device) for k, v in collate([rows[i] for i in idx], pad_id).items()}
            seq = sequence_logps(model, **batch, temperature=cfg.temperature, chunk_size=cfg.logprob_chunk)
            for j, i in enumerate(idx):
                values[i] = seq.token_logps[j][seq.mask[j].bool()].cpu()
            bar.update(task, advance=len(idx))
    out = [values[i] for i in range(len(rows))]
    model.train(was_training)
    return out


def _place(per_row: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Scatter per-row completion values into the [N, L-1] layout of a training batch."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(
        mask.bool(), torch.cat(per_row).to(mask.device)
    )


class _Instances:
    """What differs between pair and group examples: how rows are laid out and which tensors exist."""

    def __init__(self, examples: list, tokenizer: PreTrainedTokenizerBase, max_length: int):
        self.examples = examples
        self.rows: list[list[Row]] = []  # per example, its completions' rows
        for ex in examples:
            if isinstance(ex, PairExample):
                self.rows.append([
                    encode(tokenizer, ex.prompt, ex.chosen, ex.chosen_truncated, max_length),
                    encode(tokenizer, ex.prompt, ex.rejected, ex.rejected_truncated, max_length),
                ])
            else:
                truncated = ex.truncated or [False] * len(ex.completions)
                self.rows.append([encode(tokenizer, ex.prompt, c, t, max_length)
                                  for c, t in zip(ex.completions, truncated)])

    def flat_rows(self) -> list[Row]:
        return [r for rows in self.rows for r in rows]

    def batch_rows(self, indices: list[int]) -> list[Row]:
        """Rows of a batch. Pairs: all chosen, then all rejected (split later with chunk(2)).
        Groups: group-major."""
        if isinstance(self.examples[0], PairExample):
            return [self.rows[i][0] for i in indices] + [self.rows[i][1] for i in indices]
        return [r for i in indices for r in self.rows[i]]

    def flat_positions(self, indices: list[int]) -> list[int]:
        """Index into flat_rows() of each row of batch_rows(indices)."""
        starts, total = [], 0
        for rows in self.rows:
            starts.append(total)
            total += len(rows)
        if isinstance(self.examples[0], PairExample):
            return [starts[i] for i in indices] + [starts[i] + 1 for i in indices]
        return [starts[i] + k for i in indices for k in range(len(self.rows[i]))]

    def tensors(self, indices: list[int], seq, extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # noqa: ANN001
        device = seq.logps.device
        exs = [self.examples[i] for i in indices]
        if isinstance(exs[0], PairExample):
            t = {
                "chosen_logps": seq.logps[: len(exs)], "rejected_logps": seq.logps[len(exs) :],
                "chosen_lengths": seq.lengths[: len(exs)], "rejected_lengths": seq.lengths[len(exs) :],
                "margins": torch.tensor([e.margin for e in exs], device=device),
                "weights": torch.tensor([e.weight for e in exs], device=device),
            }
            if "ref_token_logps" in extra:
                ref = (extra["ref_token_logps"] * seq.mask).sum(-1)
                t["ref_chosen_logps"], t["ref_rejected_logps"] = ref[: len(exs)], ref[len(exs) :]
            return t
        sizes = {len(e.scores) for e in exs}
        if len(sizes) != 1:
            raise ValueError("all groups of a batch must have the same size")
        t = {
            "token_logps": seq.token_logps, "completion_mask": seq.mask,
            "rewards": torch.tensor([e.scores for e in exs], dtype=torch.float32, device=device),
        }
        t.update(extra)
        return t


def _batches(n: int, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    order = list(range(n))
    rng.shuffle(order)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def optimize(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[PairExample] | list[GroupExample],
    cfg: OptimizationConfig,
    seed: int = 0,
    accelerator: Accelerator | None = None,
) -> dict[str, float]:
    """Train `model` in place on one round's examples; returns mean metrics over the round's steps."""
    if not examples:
        return {"steps": 0}
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    terms = [(t.name, t.weight, t.params) for t in cfg.objectives]
    specs = [OBJECTIVES[name] for name, _, _ in terms]
    instances = _Instances(examples, tokenizer, cfg.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    flat = instances.flat_rows()

    # Fixed for the whole round: computed once, before the first step.
    fixed: dict[str, list[torch.Tensor]] = {}
    if any(s.needs_reference for s in specs):
        with reference_context(model):
            fixed["ref_token_logps"] = _completion_logps(model, flat, pad_id, cfg, "reference log-probs")
    if any(s.needs_old_policy for s in specs):
        fixed["old_token_logps"] = _completion_logps(model, flat, pad_id, cfg, "old-policy log-probs")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    rng = random.Random(seed)
    sums: dict[str, float] = defaultdict(float)
    steps = 0
    n_batches = -(-len(examples) // cfg.batch_size) * cfg.epochs
    with progress() as bar:
        task = bar.add_task("training", total=n_batches, info="")
        for _epoch in range(cfg.epochs):
            for micro, indices in enumerate(_batches(len(examples), cfg.batch_size, rng)):
                batch = {k: v.to(accelerator.device)
                         for k, v in collate(instances.batch_rows(indices), pad_id).items()}
                seq = sequence_logps(model, **batch, temperature=cfg.temperature, chunk_size=cfg.logprob_chunk)
                positions = instances.flat_positions(indices)
                extra = {name: _place([values[p] for p in positions], seq.mask) for name, values in fixed.items()}
                loss, metrics = combined_loss(terms, instances.tensors(indices, seq, extra))
                accelerator.backward(loss / cfg.grad_accum)
                if (micro + 1) % cfg.grad_accum == 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                steps += 1
                sums["loss"] += loss.item()
                for k, v in metrics.items():
                    sums[k] += v.item()
                bar.update(task, advance=1, info=f"loss {loss.item():.4f}")
            if (micro + 1) % cfg.grad_accum:  # flush a partial accumulation at the end of an epoch
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return {"steps": steps, **{k: v / steps for k, v in sums.items()}}
