"""The training loop: read it top to bottom.

1. tokenise the round's examples (`Instances`: pair, point or group layout);
2. precompute what stays fixed during the round, once: reference log-probs and, for on-policy groups,
   the old-policy log-probs of the sampler; input providers prepare theirs (`providers/`);
3. for each epoch, for each batch: one forward pass over every completion of the batch (chosen and
   rejected, or a whole group, concatenated), the providers' tensors, the weighted objective list,
   backward, clip, step.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from torch.distributed.tensor import DTensor
from torch.func import functional_call
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignpipe import distributed
from alignpipe.allocator import release_free_memory
from alignpipe.config import OptimizationConfig
from alignpipe.killpoints import killpoint
from alignpipe.optimization import sharding
from alignpipe.optimization.batching import collate
from alignpipe.optimization.instances import Instances, Row
from alignpipe.optimization.logprobs import SequenceLogps, sequence_logps
from alignpipe.optimization.objectives import OBJECTIVES, combined_loss
from alignpipe.optimization.providers import InputProvider, RoundContext, providers_for, validate_options
from alignpipe.optimization.round_signal import implicit_reward_signal, labelled, objective_beta
from alignpipe.precision import resolve_precision
from alignpipe.progress import progress

T = TypeVar("T")


def reference_context(model: PreTrainedModel, reference: str = "base") -> contextlib.AbstractContextManager:
    """The reference policy without a second copy.

    "base": adapters disabled (the frozen base under LoRA / IA3 / prefix tuning);
    "round_start": the policy as it is before the round's first step (ref = M_t of iterative DPO,
    the staged reference of sDPO). Under full fine-tuning "base" needs a frozen copy: the loop passes
    one as `reference_model` instead.
    """
    if reference == "base" and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


class MovingReference:
    """TR-DPO's soft-updated reference (arXiv 2404.09656) over the trainable parameters: a shadow copy
    that is swapped in to compute reference log-probs, and pulled toward the policy every `every` steps
    by ref <- alpha * theta + (1 - alpha) * ref. Under LoRA the shadow is the adapter (reference =
    base + shadow adapter), which starts equal to the policy at the start of the round.

    Two ways to compute under the shadow: `swapped_in()` copies it into the live parameters (the trainer,
    before the policy forward); `state()` / `call()` substitute it functionally, leaving the live parameters
    and the autograd graph of a forward already run untouched (input providers, after that forward). The
    latter need `names`, the parameters' names in the model (`named_parameters`)."""

    def __init__(self, params: list[torch.nn.Parameter], alpha: float, every: int, names: list[str] | None = None):
        self.params, self.alpha, self.every, self.names = params, alpha, every, names
        self.shadow = [p.detach().clone() for p in params]

    def state(self) -> dict[str, torch.Tensor]:
        """The shadow weights by parameter name (for `torch.func.functional_call` on the model)."""
        if self.names is None:
            raise ValueError("MovingReference built without parameter names")
        return dict(zip(self.names, self.shadow, strict=True))

    def call(self, model: torch.nn.Module, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(model, *args, **kwargs)` with the shadow substituted for the live trainable parameters of `model`,
        functionally (`torch.func.functional_call` on a wrapper whose only submodule is `model`)."""
        state = {f"model.{name}": tensor for name, tensor in self.state().items()}
        return functional_call(_Apply(model), state, (fn, *args), kwargs)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, r in zip(self.params, self.shadow, strict=True):
                p.copy_(r)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live, strict=True):
                    p.copy_(v)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if step % self.every == 0:
            for p, r in zip(self.params, self.shadow, strict=True):
                r.mul_(1 - self.alpha).add_(p.detach(), alpha=self.alpha)


class _Apply(torch.nn.Module):
    """`forward(fn, ...)` = `fn(model, ...)`: lets `functional_call` substitute `model`'s parameters around any
    function of the model (not only its `forward`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)


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


def keep_mlp_projections(config: Any) -> Callable[[], Any] | None:
    """A selective-checkpointing context for torch's `checkpoint`: the outputs of the matmuls from the hidden size
    to the MLP's intermediate size (a Llama-style layer's gate and up projections) are saved in the forward pass;
    every other op is recomputed in backward. None where the config names no intermediate size."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    hidden, inner = getattr(config, "hidden_size", None), getattr(config, "intermediate_size", None)
    if not hidden or not inner or hidden == inner:
        return None
    matmuls = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}

    def policy(_ctx: Any, op: Any, *args: Any, **_kwargs: Any) -> CheckpointPolicy:
        if op in matmuls and args[-2].shape[-1] == hidden and args[-1].shape[-1] == inner:
            return CheckpointPolicy.MUST_SAVE  # [tokens, hidden] @ [hidden, intermediate]: not LoRA's rank-r parts
        return CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


@contextlib.contextmanager
def gradient_checkpointing(model: PreTrainedModel, mode: bool | str) -> Iterator[None]:
    """The model's decoder layers checkpointed (non-reentrant: recomputed in backward, same values and
    gradients) while the block runs, as it was afterwards. `mode`: True (recompute all of a layer), "selective"
    (keep the MLP's gate/up projections, `keep_mlp_projections`, under full fine-tuning; as True under an
    adapter), False (off). Skipped for prompt-learning adapters (prefix tuning feeds its virtual tokens as a cache)
    and models that cannot."""
    peft_config = getattr(model, "active_peft_config", None)
    prompt_learning = peft_config is not None and peft_config.is_prompt_learning
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not mode or prompt_learning or not getattr(base, "supports_gradient_checkpointing", False) \
            or base.is_activation_checkpointing:
        yield
        return
    kwargs: dict[str, Any] = {"use_reentrant": False}
    # selective under an adapter: the policy runs in Python for every op, and LoRA adds six ops to each projection;
    # measured on the embedded model, that costs about what it saves (docs/performance.md), so whole layers there
    selective = keep_mlp_projections(base.config) if mode == "selective" and peft_config is None else None
    if selective is not None:
        kwargs["context_fn"] = selective
    base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    try:
        yield
    finally:
        base.activation_checkpointing_disable()


def autocast(cfg: OptimizationConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for the model's matmuls when the precision resolves to bf16 (`auto`: only where the
    device computes bf16 natively, see `alignpipe.precision`); log-softmax and losses stay in fp32
    (logprobs.py casts the logits)."""
    enabled = resolve_precision(cfg.precision, device.type) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _place(per_row: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Scatter per-row completion values into the [N, L-1] layout of a training batch."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(
        mask.bool(), torch.cat(per_row).to(mask.device)
    )


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

    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
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
        release_free_memory()  # the step's freed activations go back before the next step (allocator.py)
        updates += 1
        if moving is not None:
            moving.after_step(updates)

    with progress() as bar, gradient_checkpointing(model, cfg.gradient_checkpointing):
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
                placed = {name: _place([values[p] for p in positions], seq.mask) for name, values in fixed.items()}
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
