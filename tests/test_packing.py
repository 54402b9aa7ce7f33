"""Prefix-shared packing (optimization/packing.py) equals the plain padded forward: log-probs, hidden states and
gradients, for pair, point and group layouts, on SDPA and eager attention, full model and LoRA."""

from __future__ import annotations

import pytest
import torch
from test_logprobs import naive_logps

from alignpipe.config import AdapterConfig
from alignpipe.models import attach_adapter, load_policy, load_tokenizer
from alignpipe.optimization.batching import collate, encode
from alignpipe.optimization.logprobs import sequence_logps
from alignpipe.optimization.packing import pack_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair_batch(tok):
    """Four pairs in the trainer's layout (all chosen rows, then all rejected rows): prompts of different
    lengths, completions that begin alike, a pair whose two rows are identical, a truncated completion, and a
    pair cut to max_length so its two rows keep different prompt tails."""
    pairs = [("What is 2 + 3?", "5", "it is 6", False),
             ("Say hi to the nice people of the world, please", "hello there", "hello friend", False),
             ("Same?", "yes", "yes", False),
             ("A prompt long enough to be cut on the left when its rows are too long " * 2,
              "short", "a much longer completion that pushes the prompt out", True)]
    chosen = [encode(tok, p, c, t, 48) for p, c, _, t in pairs]
    rejected = [encode(tok, p, r, t, 48) for p, _, r, t in pairs]
    return collate(chosen + rejected, tok.pad_token_id), [[i, len(pairs) + i] for i in range(len(pairs))]


def _group_batch(tok):
    prompts = ["What is 12 + 30?", "Name a colour"]
    completions = [["42", "it is 42", "43", "4"], ["red", "blue", "a deep red", "red"]]
    rows = [encode(tok, p, c, False, 64) for p, cs in zip(prompts, completions, strict=True) for c in cs]
    return collate(rows, tok.pad_token_id), [[0, 1, 2, 3], [4, 5, 6, 7]]


def _model(path, impl: str, lora: bool):
    model = load_policy(path)
    model.set_attn_implementation(impl)
    if lora:
        torch.manual_seed(0)
        model = attach_adapter(model, AdapterConfig(r=4, alpha=8, dropout=0.0))
        with torch.no_grad():  # B starts at zero: move it so the adapter changes the forward
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    return model.eval()


def _grads(model, seq, weights):
    model.zero_grad()
    (seq.token_logps * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("layout", ["pair", "group"])
def test_packed_equals_plain_values_and_gradients(tiny_model_path, impl, lora, layout):
    tok = load_tokenizer(tiny_model_path)
    model = _model(tiny_model_path, impl, lora)
    batch, groups = (_pair_batch if layout == "pair" else _group_batch)(tok)
    plain = sequence_logps(model, **batch, chunk_size=5)
    packed = sequence_logps(model, **batch, chunk_size=5, groups=groups)
    torch.testing.assert_close(packed.token_logps, plain.token_logps, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(packed.logps, plain.logps, atol=1e-4, rtol=1e-5)
    assert torch.equal(packed.mask, plain.mask) and torch.equal(packed.lengths, plain.lengths)
    # hidden states (read by value heads) agree on every real position, prompt included
    real = batch["attention_mask"][:, :-1].bool()
    torch.testing.assert_close(packed.hidden[real], plain.hidden[real], atol=2e-5, rtol=1e-5)
    # and both equal the textbook full log-softmax
    _, naive_tok = naive_logps(model, **batch)
    torch.testing.assert_close(packed.token_logps.double(), naive_tok, atol=2e-5, rtol=1e-5)

    weights = torch.rand(plain.token_logps.shape, generator=torch.Generator().manual_seed(1))
    g_plain, g_packed = _grads(model, plain, weights), _grads(model, packed, weights)
    assert g_plain.keys() == g_packed.keys() and g_plain
    for name in g_plain:
        torch.testing.assert_close(g_packed[name], g_plain[name], atol=1e-4, rtol=1e-4, msg=name)


def test_pack_groups_shares_the_prompt_once(tiny_model_path):
    """The layout itself: the shared prefix appears once, each rest follows with its own positions, and the
    mask lets a rest read the prefix and itself only."""
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 9, 0, 0]])
    packed = pack_groups(ids, (ids != 0).long(), [[0, 1]])
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    mask = packed.attention[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0],
                    [1, 1, 1, 0, 0],
                    [1, 1, 1, 1, 0],
                    [1, 1, 0, 0, 1]]  # the second rest reads the prefix, not the first rest
    assert packed.index[0, :4].tolist() == [0, 1, 2, 3] and packed.index[1, :3].tolist() == [0, 1, 4]


def test_packing_saves_the_prompt_positions(tiny_model_path):
    """Each prompt once: a pair of prompt P and completions c1, c2 costs P + c1 + c2 positions, not 2P + c1 + c2."""
    tok = load_tokenizer(tiny_model_path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me about the weather today."}],
                                     tokenize=False, add_generation_prompt=True)
    rows = [encode(tok, prompt, "It is sunny.", False, 256), encode(tok, prompt, "Rain all day.", False, 256)]
    batch = collate(rows, tok.pad_token_id)
    packed = pack_groups(batch["input_ids"], batch["attention_mask"], [[0, 1]])
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    plain = int(batch["attention_mask"].sum())
    assert packed.input_ids.shape[1] == plain - n_prompt
