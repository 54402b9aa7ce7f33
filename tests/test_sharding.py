"""FSDP while a round trains (optimization/sharding.py): accelerate's FSDP settings read from the launcher's
environment, and the decoder sharded with FSDP2 then made plain again (same values, no FSDP left behind, and
shardable again the next round). The 2-process runs are in test_distributed.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from tiny import arithmetic_pairs, lora
from torch.distributed.tensor import DTensor

from alignpipe import AlignpipeError
from alignpipe.optimization.batching import collate
from alignpipe.optimization.instances import Instances
from alignpipe.optimization.logprobs import sequence_logps
from alignpipe.optimization.sharding import Sharding, from_environment, shard, unshard

pytestmark = pytest.mark.usefixtures("one_thread")

FSDP = {"ACCELERATE_USE_FSDP": "true"}


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    (FSDP, Sharding(reshard_after_forward=True)),  # accelerate's default strategy: FULL_SHARD
    (FSDP | {"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}, Sharding(reshard_after_forward=False)),
    (FSDP | {"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"}, Sharding(reshard_after_forward=True)),
    (FSDP | {"FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, Sharding(reshard_after_forward=False)),
    (FSDP | {"FSDP_SHARDING_STRATEGY": "2"}, Sharding(reshard_after_forward=False)),  # older configs: numbers
    (FSDP | {"FSDP_SHARDING_STRATEGY": "NO_SHARD"}, None),
])
def test_settings_from_accelerate_environment(env, expected):
    assert from_environment(env) == expected


@pytest.mark.parametrize(("env", "message"), [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DEEPSPEED: alignpipe shards with FSDP instead"),
    (FSDP | {"FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"}, "HYBRID_SHARD is not supported"),
    (FSDP | {"FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params: true is not supported"),
])
def test_unsupported_settings_fail_with_one_line(env, message):
    with pytest.raises(AlignpipeError, match=message):
        from_environment(env)


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group: FSDP2 runs on it as on N processes (every collective is over one rank)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _logps(model, tok) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Summed completion log-probs of four pairs and the gradients of their sum (trainable parameters)."""
    instances = Instances(arithmetic_pairs(tok)[:4], tok, 64)
    batch = collate(instances.batch_rows([0, 1, 2, 3]), tok.pad_token_id)
    model.zero_grad(set_to_none=True)
    logps = sequence_logps(model, **batch, groups=instances.batch_groups([0, 1, 2, 3])).logps
    logps.sum().backward()
    grads = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
             for p in model.parameters() if p.requires_grad]
    return logps.detach(), grads


@pytest.mark.parametrize("reshard_after_forward", [True, False])
def test_shard_then_unshard_keeps_values_and_leaves_a_plain_model(process_group, tiny_model_path, tok,
                                                                  reshard_after_forward):
    model = lora(tiny_model_path)
    classes = [type(m) for m in model.modules()]
    plain_values, plain_grads = _logps(model, tok)

    for _round in range(2):  # the next round shards the same modules again
        sharded = shard(model, Sharding(reshard_after_forward))
        assert len(sharded) == 3  # the tiny model's 2 decoder layers and the decoder
        layer_params = [p for m in sharded[:2] for p in m.parameters()]
        assert layer_params and all(isinstance(p, DTensor) for p in layer_params)
        # the tied embedding / LM head stays whole
        assert not isinstance(model.get_base_model().get_input_embeddings().weight, DTensor)
        values, grads = _logps(model, tok)
        torch.testing.assert_close(values, plain_values)
        for g, ref in zip(grads, plain_grads, strict=True):
            torch.testing.assert_close(g, ref)
        unshard(sharded)
        assert [type(m) for m in model.modules()] == classes
        assert not any(isinstance(p, DTensor) for p in model.parameters())
        assert all(not m._forward_pre_hooks and not m._forward_hooks for m in sharded)  # noqa: SLF001
        with torch.no_grad():  # a plain forward again: generate needs no other process
            out = model.generate(**tok("3+4=", return_tensors="pt"), max_new_tokens=3, do_sample=False)
        assert out.shape[1] > 3
        values, _ = _logps(model, tok)
        torch.testing.assert_close(values, plain_values)


def test_a_model_without_decoder_layer_classes_is_refused(process_group, tiny_model_path):
    model = lora(tiny_model_path)
    model.get_base_model()._no_split_modules = None  # noqa: SLF001
    with pytest.raises(AlignpipeError, match="names no decoder layer classes"):
        shard(model, Sharding())
