"""FSDP while a round trains: the decoder layers sharded across the processes with torch's FSDP2 (`fully_shard`),
whole again when the round's steps are done.

accelerate's FSDP config file (`distributed_type: FSDP`, examples/accelerate/) reaches each launched process as
environment variables; `from_environment` reads them. `fsdp_reshard_after_forward: true` (or
`fsdp_sharding_strategy: FULL_SHARD`) shards parameters, gradients and optimizer state, as DeepSpeed's ZeRO-3
does; `false` (`SHARD_GRAD_OP`) keeps a layer's gathered parameters from its forward until its backward, as
ZeRO-2 keeps whole parameters.

Why only while training. Outside the steps every process samples, judges and evaluates its own prompts with a
different number of forward passes (HF generate), and FSDP gathers parameters with a collective in every
forward: the processes would wait on each other for ever. Checkpoints and the final model want whole tensors
too. So `shard` runs at the round's first step and `unshard` at its end; in between, gradients are
reduce-scattered by FSDP (averaged, the same arithmetic as `distributed.average_gradients`).

What is sharded: every decoder layer (the classes in the model's `_no_split_modules`, as accelerate's
transformer wrap policy picks them) and the decoder's own parameters (the final norm). The token embeddings and
the LM head stay whole on every process: they are often one tied tensor, and the head runs outside the
decoder's forward (in chunks, logprobs.py). Their gradients are averaged with the other whole parameters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn

from alignpipe import AlignpipeError, distributed
from alignpipe.models import base_model


@dataclass(frozen=True)
class Sharding:
    reshard_after_forward: bool = True  # ZeRO-3-like; False: ZeRO-2-like

    def describe(self) -> str:
        what = "parameters, gradients and optimizer state" if self.reshard_after_forward else \
            "gradients and optimizer state"
        return f"FSDP while training: the decoder layers' {what} sharded"


def from_environment(env: dict[str, str] | None = None) -> Sharding | None:
    """The FSDP settings accelerate's launcher passed on (None: no FSDP). A DeepSpeed config, or an FSDP
    setting alignpipe does not run, is a one-line error."""
    env = dict(os.environ) if env is None else env
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise AlignpipeError(distributed.DEEPSPEED_ERROR)
    if env.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return None
    if env.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        raise AlignpipeError("accelerate FSDP config: fsdp_offload_params: true is not supported; set it to false")
    strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
    strategies = {"1": "FULL_SHARD", "2": "SHARD_GRAD_OP", "3": "NO_SHARD"}
    strategy = strategies.get(strategy, strategy)
    if strategy == "NO_SHARD":
        return None  # replicated parameters: the plain data-parallel path
    if strategy not in ("FULL_SHARD", "SHARD_GRAD_OP"):
        raise AlignpipeError(f"accelerate FSDP config: fsdp_sharding_strategy {strategy} is not supported; use "
                             "FULL_SHARD or SHARD_GRAD_OP (or fsdp_reshard_after_forward: true / false)")
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD")
    if reshard is None or env.get("FSDP_VERSION", "1") == "1":
        return Sharding(reshard_after_forward=strategy == "FULL_SHARD")
    return Sharding(reshard_after_forward=reshard.lower() == "true")


def _units(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """(the decoder layers, the decoder) of a causal LM, innermost first: the order they are sharded in."""
    base = base_model(model)
    layer_classes = set(getattr(base, "_no_split_modules", None) or [])
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if not layer_classes or decoder is None or decoder is base:
        raise AlignpipeError(f"FSDP: {type(base).__name__} names no decoder layer classes (_no_split_modules); "
                             "run it without an FSDP accelerate config")
    layers = [m for m in decoder.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise AlignpipeError(f"FSDP: no module of {sorted(layer_classes)} in {type(base).__name__}'s decoder")
    return layers, decoder


def shard(model: nn.Module, settings: Sharding) -> list[nn.Module]:
    """Shard `model`'s decoder in place (every process, together); returns the sharded modules for `unshard`."""
    from torch.distributed.fsdp import fully_shard

    layers, decoder = _units(model)
    base = base_model(model)
    whole = {p for m in (base.get_input_embeddings(), base.get_output_embeddings()) if m is not None
             for p in m.parameters()}
    sharded = []
    for module in [*layers, decoder]:
        original = type(module)
        fully_shard(module, reshard_after_forward=settings.reshard_after_forward, ignored_params=whole)
        module._alignpipe_unsharded_class = original  # noqa: SLF001 (read back by unshard)
        sharded.append(module)
    return sharded


def unshard(modules: list[nn.Module]) -> None:
    """Make `shard`'s modules plain again, on every process together: every parameter a whole tensor (gathered),
    FSDP's hooks, state and class gone. torch has no public inverse of `fully_shard`; this removes what it
    installs on a module (torch 2.13's FSDP2)."""
    from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    for module in modules:  # the same order on every process: each full_tensor() is an all-gather
        state = fully_shard.state(module)
        group = state._fsdp_param_group  # noqa: SLF001
        if group is not None:
            for fsdp_param in group.fsdp_params:
                info, sharded = fsdp_param._module_info, fsdp_param.sharded_param  # noqa: SLF001
                # full_tensor() gathers into a new tensor: no copy needed
                whole = sharded.full_tensor() if isinstance(sharded, DTensor) else sharded.detach().clone()
                param = nn.Parameter(whole.detach(), requires_grad=sharded.requires_grad)
                owners = [(info.module, info.param_name),  # and where the tensor is tied within the unit
                          *zip(info.shared_modules, info.shared_param_names, strict=True)]
                for owner, name in owners:
                    owner._parameters[name] = param  # noqa: SLF001
            for handles in (group._module_to_pre_save_state_dict_hook_handle,  # noqa: SLF001
                            group._module_to_pre_load_state_dict_hook_handle):  # noqa: SLF001
                for handle in handles.values():
                    handle.remove()
        state._pre_forward_hook_handle.remove()  # noqa: SLF001
        state._post_forward_hook_handle.remove()  # noqa: SLF001
        module.__class__ = module._alignpipe_unsharded_class  # noqa: SLF001
        del module._alignpipe_unsharded_class
        module.__dict__.pop(STATE_KEY, None)
        module.__dict__.pop(REGISTRY_KEY, None)
        _module_state_mapping.pop(module, None)
