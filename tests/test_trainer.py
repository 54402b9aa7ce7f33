"""Training smoke tests on the tiny model: the loss falls and the signal the objective reads improves."""

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alignpipe.config import ObjectiveTerm, OptimizationConfig
from alignpipe.models import load_policy, load_tokenizer
from alignpipe.optimization.batching import collate, encode
from alignpipe.optimization.checkpointing import gradient_checkpointing
from alignpipe.optimization.instances import Instances
from alignpipe.optimization.logprobs import sequence_logps
from alignpipe.optimization.reference import reference_context
from alignpipe.optimization.trainer import optimize
from alignpipe.records import GroupExample, PairExample


class CountMatmuls(TorchDispatchMode):
    """Counts the matmuls (mm, addmm) that run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        return func(*args, **(kwargs or {}))


def _pairs(tok):
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                     add_generation_prompt=True)
    return [PairExample(prompt=prompt, chosen=c, rejected=r, margin=1.0)
            for c, r in [("5", "6"), ("it is 5", "it is 7"), ("5.", "9."), ("five 5", "nine 9")]]


def _preference_accuracy(model, tok, pairs):
    rows = [encode(tok, p.prompt, p.chosen, False, 64) for p in pairs] + \
           [encode(tok, p.prompt, p.rejected, False, 64) for p in pairs]
    with torch.no_grad():
        seq = sequence_logps(model.eval(), **collate(rows, tok.pad_token_id))
    with torch.no_grad(), reference_context(model):
        ref = sequence_logps(model, **collate(rows, tok.pad_token_id))
    lr = seq.logps - ref.logps
    n = len(pairs)
    return (lr[:n] > lr[n:]).float().mean().item(), seq.logps[:n].mean().item()


def test_dpo_with_lora_learns_pairs(tiny_model_path):
    from peft import LoraConfig, get_peft_model

    tok = load_tokenizer(tiny_model_path)
    model = get_peft_model(load_policy(tiny_model_path), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    pairs = _pairs(tok) * 4
    cfg = OptimizationConfig(objectives=[ObjectiveTerm(name="dpo", beta=0.5)], learning_rate=3e-3, batch_size=4,
                             epochs=1)
    first = optimize(model, tok, pairs, cfg, seed=0)
    for _ in range(4):
        last = optimize(model, tok, pairs, cfg, seed=1)
    acc, _ = _preference_accuracy(model, tok, _pairs(tok))
    assert last["loss"] < first["loss"] and acc == 1.0
    assert last["dpo/margin"] > first["dpo/margin"] > -1.0


def test_full_finetune_sft_raises_chosen_likelihood(tiny_model_path):
    tok = load_tokenizer(tiny_model_path)
    model = load_policy(tiny_model_path)
    pairs = _pairs(tok)
    _, before = _preference_accuracy(model, tok, pairs)
    cfg = OptimizationConfig(objectives=[ObjectiveTerm(name="sft")], adapter=None, learning_rate=1e-3, batch_size=2,
                             epochs=5)
    metrics = optimize(model, tok, pairs, cfg)
    _, after = _preference_accuracy(model, tok, pairs)
    assert after > before + 1.0 and metrics["steps"] == 10


def test_grpo_raises_group_reward(tiny_model_path):
    """Completions with reward 1 gain probability relative to those with reward 0."""
    from peft import LoraConfig, get_peft_model

    tok = load_tokenizer(tiny_model_path)
    model = get_peft_model(load_policy(tiny_model_path), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    prompt = tok.apply_chat_template([{"role": "user", "content": "say 7"}], tokenize=False, add_generation_prompt=True)
    groups = [GroupExample(prompt=prompt, completions=["7", "8", "7 7", "x"], scores=[1.0, 0.0, 1.0, 0.0])] * 8
    cfg = OptimizationConfig(objectives=[ObjectiveTerm(name="grpo", beta=0.0)], learning_rate=3e-3, batch_size=2,
                             epochs=1)

    def good_minus_bad():
        rows = [encode(tok, prompt, c, False, 64) for c in groups[0].completions]
        with torch.no_grad():
            lp = sequence_logps(model.eval(), **collate(rows, tok.pad_token_id)).logps
        return (lp[0] + lp[2] - lp[1] - lp[3]).item()

    before = good_minus_bad()
    # One optimizer step per generation batch: the policy is still the sampler, the ratio is exactly 1.
    one_step = optimize(model, tok, groups, cfg.model_copy(update={"batch_size": len(groups)}))
    assert one_step["steps"] == 1 and one_step["grpo/clip_fraction"] == 0.0
    for _ in range(3):
        optimize(model, tok, groups, cfg)
    assert good_minus_bad() > before + 1.0


def test_moving_reference_soft_update_and_swap():
    """TR-DPO: ref <- a*theta + (1-a)*ref every `every` steps; swapping in leaves the live weights intact."""
    from alignpipe.optimization.reference import MovingReference

    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    mover = MovingReference([w], alpha=0.6, every=2)
    with torch.no_grad():
        w.copy_(torch.tensor([3.0, 4.0]))
    mover.after_step(1)  # not a sync step
    assert mover.shadow[0].tolist() == [1.0, 2.0]
    mover.after_step(2)
    expected = [0.6 * 3.0 + 0.4 * 1.0, 0.6 * 4.0 + 0.4 * 2.0]
    assert torch.allclose(mover.shadow[0], torch.tensor(expected))
    with mover.swapped_in():
        assert torch.allclose(w.detach(), torch.tensor(expected))
    assert w.tolist() == [3.0, 4.0]


def test_dpo_with_moving_reference_trains(tiny_model_path):
    from peft import LoraConfig, get_peft_model

    tok = load_tokenizer(tiny_model_path)
    model = get_peft_model(load_policy(tiny_model_path), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    cfg = OptimizationConfig(objectives=[ObjectiveTerm(name="dpo", beta=0.5)], learning_rate=3e-3, batch_size=4,
                             reference="moving", ref_sync_every=2, ref_sync_alpha=0.5)
    metrics = optimize(model, tok, _pairs(tok) * 4, cfg.model_copy(update={"epochs": 5}))
    # The reference trails the policy, so the margin stays finite, but the policy still learns the pairs.
    acc, _ = _preference_accuracy(model, tok, _pairs(tok))
    assert metrics["steps"] == 20 and metrics["dpo/loss"] < math.log(2) and acc == 1.0


def test_bf16_autocast_logps_close_to_fp32(tiny_model_path):
    from alignpipe.optimization.scoring import autocast

    tok = load_tokenizer(tiny_model_path)
    model = load_policy(tiny_model_path).eval()
    rows = [encode(tok, p.prompt, p.chosen, False, 64) for p in _pairs(tok)]
    batch = collate(rows, tok.pad_token_id)
    with torch.no_grad():
        full = sequence_logps(model, **batch)
        with autocast(OptimizationConfig(precision="bf16"), torch.device("cpu")):
            half = sequence_logps(model, **batch)
    assert half.logps.dtype == torch.float32
    torch.testing.assert_close(half.logps, full.logps, atol=0.1, rtol=0.02)


def test_length_bucketing_batches_similar_lengths_and_covers_every_example():
    import random

    from alignpipe.optimization.trainer import BUCKET_BATCHES, _batches

    rng = random.Random(5)
    lengths = [rng.randint(5, 300) for _ in range(300)]
    plain = list(_batches(300, 4, random.Random(0)))
    bucketed = list(_batches(300, 4, random.Random(0), lengths))
    assert sorted(i for b in bucketed for i in b) == list(range(300)) and all(len(b) <= 4 for b in bucketed)

    def padding(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(bucketed) < padding(plain) / 5
    # each batch is a run of one window's sorted lengths: the window is the shuffle's slice the batch came from
    shuffled = list(range(300))
    random.Random(0).shuffle(shuffled)
    windows = [shuffled[s:s + 4 * BUCKET_BATCHES] for s in range(0, 300, 4 * BUCKET_BATCHES)]
    for batch in bucketed:
        window = next(w for w in windows if batch[0] in w)
        assert set(batch) <= set(window)
        inside = sorted(window, key=lambda i: lengths[i])  # stable: ties keep their shuffled order
        start = inside.index(batch[0])
        assert batch == inside[start:start + len(batch)]
    assert list(_batches(300, 4, random.Random(0), None)) == plain  # off: the plain seeded shuffle


def test_gradient_checkpointing_trains_exactly_as_without(tiny_model_path):
    """Checkpointed decoder layers recompute in backward what they did not keep: the same updates (LoRA and full
    fine-tuning, with and without prefix sharing), and the model is left as it was found."""
    from peft import LoraConfig, get_peft_model

    tok = load_tokenizer(tiny_model_path)
    assert load_policy(tiny_model_path).supports_gradient_checkpointing  # so the comparison is not vacuous
    for adapter in (True, False):
        for sharing in (True, False):
            trained = []
            for checkpointing in ("selective", True, False):
                torch.manual_seed(0)
                model = load_policy(tiny_model_path)
                if adapter:
                    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
                cfg = OptimizationConfig(objectives=[ObjectiveTerm(name="dpo", beta=0.5), ObjectiveTerm(name="sft")],
                                         learning_rate=3e-3, batch_size=4, gradient_checkpointing=checkpointing,
                                         prefix_sharing=sharing, precision="fp32")
                reference = None if adapter else load_policy(tiny_model_path).eval().requires_grad_(False)
                optimize(model, tok, _pairs(tok) * 2, cfg, seed=0, reference_model=reference)
                base = model.get_base_model() if adapter else model
                assert not base.is_activation_checkpointing
                trained.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
            for checkpointed in trained[:2]:
                assert checkpointed.keys() == trained[2].keys()
                diff = max((checkpointed[n] - trained[2][n]).abs().max().item() for n in trained[2])
                assert diff < 1e-6, (adapter, sharing, diff)


def test_selective_checkpointing_skips_recomputing_the_kept_projections(tiny_model_path):
    """Under "selective", backward recomputes fewer matmuls per decoder layer than under full checkpointing: two
    under full fine-tuning (the gate and up projections, kept from the forward pass), the seven frozen base
    projections under LoRA on every linear layer (its rank-r matmuls are still recomputed), but only for the
    layers whose outputs fit in `keep_mb`; the gradients are the same whatever is kept."""
    from peft import LoraConfig, get_peft_model

    tok = load_tokenizer(tiny_model_path)
    batch = collate(Instances(_pairs(tok), tok, 64).batch_rows([0, 1]), tok.pad_token_id)
    layers = load_policy(tiny_model_path).config.num_hidden_layers
    assert layers >= 2
    runs = [(False, True, "all"), (False, "selective", "all"),  # (adapter, mode, what keep_mb allows)
            (True, True, "all"), (True, "selective", "all"), (True, "selective", "one layer"), (True, "selective", "none")]
    counts, grads = {}, {}
    for adapter, mode, allowed in runs:
        keep_mb = {"all": 512, "none": 0}.get(allowed, 0.0)
        torch.manual_seed(0)
        model = load_policy(tiny_model_path)
        if adapter:
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
            first = [m for m in model.get_base_model().model.layers[0].modules()
                     if type(m) is torch.nn.Linear and not m.weight.requires_grad]
            assert len(first) == 7
            if allowed == "one layer":  # what one layer's seven projections output, in MB (fp32)
                keep_mb = sum(m.out_features for m in first) * batch["input_ids"].numel() * 4 / 2**20
        model.train()
        with gradient_checkpointing(model, mode, keep_mb):
            logps = sequence_logps(model, **batch).logps.sum()
            with CountMatmuls() as counter:
                logps.backward()
        counts[adapter, mode, allowed] = counter.count
        grads[adapter, mode, allowed] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    full, lora = counts[False, True, "all"], counts[True, True, "all"]
    assert full - counts[False, "selective", "all"] == 2 * layers, counts
    assert lora - counts[True, "selective", "all"] == 7 * layers, counts
    assert lora - counts[True, "selective", "one layer"] == 7, counts
    assert lora == counts[True, "selective", "none"], counts
    for key, value in grads.items():
        reference = grads[key[0], True, "all"]
        assert max((a - b).abs().max().item() for a, b in zip(value, reference, strict=True)) < 1e-6, key


def test_kept_projections_under_bf16_autocast_give_the_same_gradients(tiny_model_path):
    """Under bf16 autocast the kept base projections are bf16 and backward multiplies in bf16 as autocast's own
    linear does: the adapter's gradients equal those of whole-layer checkpointing."""
    from peft import LoraConfig, get_peft_model

    tok = load_tokenizer(tiny_model_path)
    batch = collate(Instances(_pairs(tok), tok, 64).batch_rows([0, 1]), tok.pad_token_id)
    grads = {}
    for mode in (True, "selective"):
        torch.manual_seed(0)
        model = get_peft_model(load_policy(tiny_model_path), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        model.train()
        with gradient_checkpointing(model, mode), torch.autocast("cpu", dtype=torch.bfloat16):
            sequence_logps(model, **batch).logps.sum().backward()
        grads[mode] = [p.grad for p in model.parameters() if p.requires_grad]
    assert max(g.abs().max().item() for g in grads[True]) > 0
    assert max((a - b).abs().max().item() for a, b in zip(grads["selective"], grads[True], strict=True)) < 1e-6


def test_kept_projections_budget_is_free_again_after_each_backward(tiny_model_path):
    """With LoRA on q/v only, a layer's down projection is frozen and nothing after it saves a tensor, so backward's
    recomputation stops before it takes its kept output back. That output's bytes must count against the budget
    only until the pass's graph is freed: with a budget of exactly every layer's outputs, later forward + backward
    passes keep as much as the first (as many matmuls skipped)."""
    from peft import LoraConfig, get_peft_model

    tok = load_tokenizer(tiny_model_path)
    batch = collate(Instances(_pairs(tok), tok, 64).batch_rows([0, 1]), tok.pad_token_id)
    model = get_peft_model(load_policy(tiny_model_path), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.train()
    first = [m for m in model.get_base_model().model.layers[0].modules()
             if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    layers = model.get_base_model().config.num_hidden_layers
    keep_mb = layers * sum(m.out_features for m in first) * batch["input_ids"].numel() * 4 / 2**20
    counts = []
    for checkpointing in (True, "selective", "selective", "selective"):
        with gradient_checkpointing(model, checkpointing, keep_mb):
            for _ in range(1 if checkpointing is True else 3):
                logps = sequence_logps(model, **batch).logps.sum()
                with CountMatmuls() as counter:
                    logps.backward()
                counts.append(counter.count)
    assert counts[0] - counts[1] >= 6 * layers, counts  # the projections were kept (down's is not retaken)
    assert len(set(counts[1:])) == 1, counts
