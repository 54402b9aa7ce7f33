"""The training loop: read it top to bottom. What it stands on, bottom-up: `logprobs.py` (forward passes and
completion log-probs), `reference.py` (the reference policy by mode), `scoring.py` (gradient-free passes under the
policy or the reference), `checkpointing.py` and `sharding.py` (memory while training), `providers/` (what the
recipe's objectives need beyond log-probs).

1. tokenise the round's examples (`Instances`: pair, point or group layout);
2. precompute what stays fixed during the round, once: reference log-probs and, for on-policy groups,
   the old-policy log-probs of the sampler; input providers prepare theirs (`providers/`);
3. for each epoch, for each batch: one forward pass over every completion of the batch (chosen and
   rejected, or a whole group, concatenated), the providers' tensors, the weighted objective list,
   backward, clip, step.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignpipe import distributed
from alignpipe.config import OptimizationConfig
from alignpipe.killpoints import killpoint
from alignpipe.optimization import sharding
from alignpipe.optimization.batching import collate
from alignpipe.optimization.checkpointing import gradient_checkpointing
from alignpipe.optimization.instances import Instances
from alignpipe.optimization.logprobs import sequence_logps
from alignpipe.optimization.objectives import OBJECTIVES, combined_loss
from alignpipe.optimization.providers import InputProvider, RoundContext, providers_for, validate_options
from alignpipe.optimization.reference import MovingReference
from alignpipe.optimization.round_signal import implicit_reward_signal, labelled, objective_beta
from alignpipe.optimization.scoring import autocast, completion_logps, place, reference_logps
from alignpipe.progress import progress


def round_providers(specs: list, kind: str, cfg: OptimizationConfig, kept: list[InputProvider]) -> list[InputProvider]:
    """The providers whose tensors the objectives read: those in `kept` are reused, missing ones are created
    (options from the recipe's `optimization.inputs`) and appended to `kept`."""
    wanted = {name for s in specs for name in s.inputs}
    options = validate_options(cfg.inputs)
    out = []
    for cls in providers_for(wanted, kind):
        provider = next((p for p in kept if type(p) is cls), None)
        if provider is None:
            provider = cls(options.get(cls.name))
            kept.append(provider)
        out.append(provider)
    return out


def _batch_metrics(values: dict[str, torch.Tensor], share: float, tokens: int) -> dict[str, float]:
    """One step's logged values over the whole batch: with several processes, each one's values weighted by its
    share (`distributed.local_share`) and averaged, tokens summed."""
    local = {k: v.item() * share for k, v in values.items()} | {"tokens": tokens}
    if distributed.world_size() == 1:
        return local
    parts = distributed.all_gather(local)
    return {k: sum(p[k] for p in parts) / (1 if k == "tokens" else len(parts)) for k in local}


BUCKET_BATCHES = 16  # length bucketing sorts windows of this many batches: shorter padding, order still shuffled


def _batches(n: int, batch_size: int, rng: random.Random, lengths: list[int] | None = None) -> Iterator[list[int]]:
    """Example indices of each step: a seeded shuffle cut into batches. With `lengths` (length bucketing), each
    window of BUCKET_BATCHES batches of the shuffle is sorted by length before it is cut, and the batches are
    then shuffled again: a batch holds examples of similar length, so little of it is padding."""
    order = list(range(n))
    rng.shuffle(order)
    if lengths is None:
        yield from (order[start : start + batch_size] for start in range(0, n, batch_size))
        return
    window, batches = batch_size * BUCKET_BATCHES, []
    for start in range(0, n, window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    yield from batches


def optimize(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list,
    cfg: OptimizationConfig,
    seed: int = 0,
    accelerator: Accelerator | None = None,
    reference_model: PreTrainedModel | None = None,
    providers: list[InputProvider] | None = None,
) -> dict[str, float]:
    """Train `model` in place on one round's examples; returns mean metrics over the round's steps.

    `providers`: the caller's list of input providers; the ones the objectives need and the list lacks are
    created and appended to it, so that a caller keeping the list (the loop) keeps heads training across
    rounds and can save them with each checkpoint."""
    if not examples:
        return {"steps": 0}
    # dropout draws from torch's global RNG, whose state depends on what ran before in this process (sampling
    # reseeds it per batch; a resumed run reads the samples back): seed it so a resumed round trains the same
    torch.manual_seed(seed)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    terms = [(t.name, t.weight, t.params) for t in cfg.objectives]
    specs = [OBJECTIVES[name] for name, _, _ in terms]
    instances = Instances(examples, tokenizer, cfg.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    flat, flat_groups = instances.flat_rows(), instances.flat_groups()

    # Fixed for the whole round: computed once, before the first step (on the whole model: each process
    # scores its own batches).
    fixed: dict[str, list[torch.Tensor]] = {}
    moving_reference = any(s.needs_reference for s in specs) and cfg.reference == "moving"
    if any(s.needs_reference for s in specs) and not moving_reference:
        fixed["ref_token_logps"] = reference_logps(model, flat, pad_id, cfg, "reference log-probs", reference_model,
                                                   flat_groups, shared=True)
    if any(s.needs_old_policy for s in specs):
        fixed["old_token_logps"] = completion_logps(model, flat, pad_id, cfg, "old-policy log-probs", flat_groups,
                                                     shared=True)
    signal: dict[str, float] = {}
    measure = cfg.measure_signal and "ref_token_logps" in fixed
    if measure:  # the implicit reward on the round's examples before its first step (round_signal.py)
        before = fixed.get("old_token_logps") or completion_logps(model, flat, pad_id, cfg, "signal before",
                                                                            flat_groups, shared=True)
        signal |= labelled(implicit_reward_signal(instances.kind, before, fixed["ref_token_logps"],
                                                  objective_beta(terms)), "before")
    settings = sharding.from_environment() if distributed.world_size() > 1 else None
    if distributed.world_size() > 1:  # data-parallel: each process runs its share of a batch, step() averages the
        model.to(accelerator.device)  # gradients (no DDP wrapper: the forward passes call the decoder and head)
    sharded = sharding.shard(model, settings) if settings else []  # FSDP: whole again after the steps
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    moving = MovingReference(params, cfg.ref_sync_alpha, cfg.ref_sync_every, [n for n, _ in named]) \
        if moving_reference else None
    ctx = RoundContext(model, tokenizer, instances, cfg, pad_id, accelerator.device, reference_model, moving)
    providers = round_providers(specs, instances.kind, cfg, providers if providers is not None else [])
    for provider in providers:
        provider.prepare(ctx)
    # one AdamW: the policy's parameters at cfg.learning_rate, each provider's groups at their own lr if set
    groups = [g for g in [{"params": params}] + [g for p in providers for g in p.param_groups()] if g["params"]]
    params = [p for g in groups for p in g["params"]]

    # torch's fused kernel where it can run (plain floating-point tensors on CPU or CUDA, not FSDP's DTensors): the
    # same update in one pass per tensor, without the per-step temporaries of the default implementation
    # (135M parameters on 2 CPU cores: 0.13 s a step against 0.4-0.8 s, docs/performance.md)
    fused = all(type(p) is torch.nn.Parameter and p.is_floating_point() and p.device.type in ("cpu", "cuda")
                for p in params)
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused or None)
    if distributed.world_size() == 1:
        model, optimizer = accelerator.prepare(model, optimizer)
    whole = [p for p in params if not isinstance(p, DTensor)]  # FSDP averages the sharded ones' gradients
    model.train()
    rng = random.Random(seed)
    lengths = [sum(len(ids) for ids, _ in rows) for rows in instances.rows] if cfg.length_bucketing else None
    sums: dict[str, float] = defaultdict(float)
    steps = updates = 0
    grad_norms: list[float] = []
    tokens, train_seconds = 0, 0.0

    def step() -> None:
        nonlocal updates
        distributed.average_gradients(whole)
        norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)  # the norm before clipping
        if norm is not None:
            grad_norms.append(float(norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        updates += 1
        if moving is not None:
            moving.after_step(updates)

    with progress() as bar, gradient_checkpointing(model, cfg.gradient_checkpointing, cfg.checkpoint_keep_mb):
        task = bar.add_task("training", total=-(-len(examples) // cfg.batch_size) * cfg.epochs, info="")
        for _epoch in range(cfg.epochs):
            for micro, batch_indices in enumerate(_batches(len(examples), cfg.batch_size, rng, lengths)):
                started = time.perf_counter()
                indices, share = distributed.local_share(batch_indices)  # all of it with one process
                batch = {k: v.to(accelerator.device) for k, v in collate(instances.batch_rows(indices), pad_id).items()}
                groups = instances.batch_groups(indices) if cfg.prefix_sharing else None
                live_ref = None
                if moving is not None:  # before the policy forward: swapping weights would break its graph
                    with moving.swapped_in(), torch.no_grad(), autocast(cfg, accelerator.device):
                        live_ref = sequence_logps(model, **batch, temperature=cfg.temperature,
                                                  chunk_size=cfg.logprob_chunk, groups=groups).token_logps
                with autocast(cfg, accelerator.device):
                    seq = sequence_logps(model, **batch, temperature=cfg.temperature, chunk_size=cfg.logprob_chunk,
                                         groups=groups)
                positions = instances.flat_positions(indices)
                placed = {name: place([values[p] for p in positions], seq.mask) for name, values in fixed.items()}
                if live_ref is not None:
                    placed["ref_token_logps"] = live_ref
                tensors = instances.tensors(indices, seq, placed)
                for provider in providers:
                    tensors.update(provider.batch(ctx, indices, seq, placed))
                loss, metrics = combined_loss(terms, tensors)
                accelerator.backward(loss * share / cfg.grad_accum)
                if (micro + 1) % cfg.grad_accum == 0:
                    step()
                steps += 1
                killpoint(f"train:step{steps}")
                train_seconds += time.perf_counter() - started
                logged = _batch_metrics({"loss": loss, **metrics}, share, int(batch["attention_mask"].sum()))
                tokens += logged.pop("tokens")
                for k, v in logged.items():
                    sums[k] += v
                bar.update(task, advance=1, info=f"loss {logged['loss']:.4f}")
            if (micro + 1) % cfg.grad_accum:  # flush a partial accumulation at the end of an epoch
                step()
    sharding.unshard(sharded)
    if measure:
        after = completion_logps(model, flat, pad_id, cfg, "signal after", flat_groups, shared=True)
        signal |= labelled(implicit_reward_signal(instances.kind, after, fixed["ref_token_logps"],
                                                  objective_beta(terms)), "after")
    timing = {"grad_norm": sum(grad_norms) / max(len(grad_norms), 1), "step_time_s": train_seconds / steps,
              "tokens_per_s": tokens / max(train_seconds, 1e-9)}
    return {"steps": steps, **{k: v / steps for k, v in sums.items()}, **timing, **signal}
