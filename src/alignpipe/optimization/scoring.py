"""Scoring passes without gradient: per-row values at completion positions (log-probs by default) under the
policy or the reference, in length-sorted batches, shared across processes; and bf16 autocast where the precision
resolves to it. Read by the trainer (reference and old-policy log-probs), the input providers, pair selection and
the held-out diagnostics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from alignpipe import distributed
from alignpipe.config import OptimizationConfig
from alignpipe.optimization.batching import collate
from alignpipe.optimization.instances import Row
from alignpipe.optimization.logprobs import SequenceLogps, sequence_logps
from alignpipe.optimization.reference import reference_context
from alignpipe.precision import resolve_precision
from alignpipe.progress import progress


def autocast(cfg: OptimizationConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for the model's matmuls when the precision resolves to bf16 (`auto`: only where the
    device computes bf16 natively, see `alignpipe.precision`); log-softmax and losses stay in fp32
    (logprobs.py casts the logits)."""
    enabled = resolve_precision(cfg.precision, device.type) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def place(per_row: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Scatter per-row completion values into the [N, L-1] layout of a training batch."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(
        mask.bool(), torch.cat(per_row).to(mask.device)
    )


@torch.no_grad()
def completion_values(model, rows: list[Row], pad_id: int, cfg: OptimizationConfig, desc: str,  # noqa: ANN001
                      per_position: Callable[[SequenceLogps], torch.Tensor] = lambda seq: seq.token_logps,
                      groups: list[list[int]] | None = None, shared: bool = False) -> list[torch.Tensor]:
    """Per row, `per_position(seq)` ([B, L-1, ...]: the token log-probs by default) at its completion
    positions, computed without gradient, dropout off, in length-sorted batches. `groups`: rows that share a
    prompt (`Instances.flat_groups`), kept together in a batch and packed when `cfg.prefix_sharing`.
    `shared`: every process of a multi-process run calls this on the same rows; each computes every N-th batch
    and all get all values (the batches do not depend on N, so neither do the values)."""
    was_training = model.training
    model.eval()
    packed = bool(groups) and cfg.prefix_sharing
    units = groups if packed else [[i] for i in range(len(rows))]
    units = sorted(units, key=lambda g: max(len(rows[i][0]) for i in g))  # similar lengths pad little
    batches: list[list[list[int]]] = [[]]
    for unit in units:  # about batch_size * 4 rows a batch, a group never split
        if batches[-1] and sum(map(len, batches[-1])) + len(unit) > cfg.batch_size * 4:
            batches.append([])
        batches[-1].append(unit)
    device = next(model.parameters()).device
    with progress(transient=True) as bar:
        task = bar.add_task(desc, total=len(rows), info="")

        def run(batch_units: list[list[int]]) -> dict[int, torch.Tensor]:
            idx = [i for unit in batch_units for i in unit]
            local, at = [], 0
            for unit in batch_units:
                local.append(list(range(at, at + len(unit))))
                at += len(unit)
            batch = {k: v.to(device) for k, v in collate([rows[i] for i in idx], pad_id).items()}
            with autocast(cfg, device):
                seq = sequence_logps(model, **batch, temperature=cfg.temperature, chunk_size=cfg.logprob_chunk,
                                     groups=local if packed else None)
            picked = per_position(seq)
            bar.update(task, advance=len(idx))
            return {i: picked[j][seq.mask[j].bool().to(picked.device)].cpu() for j, i in enumerate(idx)}

        parts = distributed.map_chunks(batches, 1, lambda chunk, _: [run(chunk[0])]) if shared else map(run, batches)
        values = {i: value for part in parts for i, value in part.items()}
    model.train(was_training)
    return [values[i] for i in range(len(rows))]


def completion_logps(model, rows: list[Row], pad_id: int, cfg: OptimizationConfig, desc: str,  # noqa: ANN001
                     groups: list[list[int]] | None = None, shared: bool = False) -> list[torch.Tensor]:
    """Per row, the log-probs of its completion tokens (1-D), computed in length-sorted batches (`shared`: as in
    `completion_values`)."""
    return completion_values(model, rows, pad_id, cfg, desc, groups=groups, shared=shared)


def reference_logps(model, rows: list[Row], pad_id: int, cfg: OptimizationConfig, desc: str,  # noqa: ANN001
                    reference_model: PreTrainedModel | None = None,
                    groups: list[list[int]] | None = None, shared: bool = False) -> list[torch.Tensor]:
    """`completion_logps` under the reference: the frozen copy when there is one (full fine-tuning against
    the base), else the policy inside `reference_context` (adapters disabled, or the policy as it is)."""
    if reference_model is not None:
        return completion_logps(reference_model, rows, pad_id, cfg, desc, groups, shared)
    with reference_context(model, cfg.reference):
        return completion_logps(model, rows, pad_id, cfg, desc, groups, shared)
