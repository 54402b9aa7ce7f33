import torch

from alignpipe.models import load_policy, load_tokenizer
from alignpipe.optimization.batching import collate, encode
from alignpipe.optimization.logprobs import sequence_logps


def naive_logps(model, input_ids, attention_mask, completion_mask, temperature=1.0):
    """The textbook computation: full log-softmax over every position, gather, mask, sum."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].double() / temperature
    tok = torch.gather(logits.log_softmax(-1), 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = completion_mask[:, 1:].double()
    return (tok * mask).sum(-1), tok * mask


def _batch(tokenizer):
    rows = [encode(tokenizer, "What is 2 + 3?", "5", False, 64),
            encode(tokenizer, "Hi", "hello there, friend", False, 64),
            encode(tokenizer, "a longer prompt here", "x", True, 64)]
    return collate(rows, tokenizer.pad_token_id)


def test_chunked_logps_equal_naive(tiny_model_path):
    model = load_policy(tiny_model_path).eval()
    tok = load_tokenizer(tiny_model_path)
    batch = _batch(tok)
    for chunk in (1, 3, 1024):
        for temperature in (1.0, 0.7):
            seq = sequence_logps(model, **batch, temperature=temperature, chunk_size=chunk)
            ref_sum, ref_tok = naive_logps(model, **batch, temperature=temperature)
            torch.testing.assert_close(seq.logps.double(), ref_sum, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(seq.token_logps.double(), ref_tok, atol=1e-5, rtol=1e-5)
    assert seq.lengths.tolist() == batch["completion_mask"][:, 1:].sum(-1).float().tolist()


def test_prompt_and_padding_do_not_count(tiny_model_path):
    model = load_policy(tiny_model_path).eval()
    tok = load_tokenizer(tiny_model_path)
    batch = _batch(tok)
    seq = sequence_logps(model, **batch)
    off = (batch["completion_mask"][:, 1:] == 0)
    assert torch.all(seq.token_logps[off] == 0)
    # the completion of row 0 is "5" + EOS: two tokens
    assert seq.lengths[0].item() == 2


def test_chunked_gradients_equal_naive(tiny_model_path):
    model = load_policy(tiny_model_path)
    tok = load_tokenizer(tiny_model_path)
    batch = _batch(tok)
    seq = sequence_logps(model, **batch, chunk_size=2)
    seq.logps.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref_sum, _ = naive_logps(model, **batch)
    ref_sum.sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad.to(grads[n].dtype), atol=1e-4, rtol=1e-3)


def test_frozen_head_gradients_equal_naive(tiny_model_path):
    """A frozen LM head (LoRA: the tied embedding takes no gradient) goes through `_FrozenHeadLogps`, whose
    backward only scales a direction computed in the forward pass: values and every trainable parameter's
    gradient equal the textbook computation's, at two temperatures and with weighted positions."""
    from alignpipe.optimization import logprobs

    model = load_policy(tiny_model_path)
    tok = load_tokenizer(tiny_model_path)
    batch = _batch(tok)
    model.get_output_embeddings().weight.requires_grad_(False)  # tied: the input embedding is frozen too
    calls = []
    original = logprobs._FrozenHeadLogps.apply
    logprobs._FrozenHeadLogps.apply = lambda *args: calls.append(1) or original(*args)
    try:
        for temperature in (1.0, 0.7):
            weights = torch.tensor([1.0, -2.0, 0.5])
            seq = sequence_logps(model, **batch, temperature=temperature, chunk_size=3)
            (seq.logps * weights).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            model.zero_grad()
            ref_sum, ref_tok = naive_logps(model, **batch, temperature=temperature)
            (ref_sum * weights.double()).sum().backward()
            torch.testing.assert_close(seq.token_logps.double(), ref_tok, atol=1e-5, rtol=1e-5)
            assert grads and all(g.abs().sum() > 0 for g in grads.values())
            for n, p in model.named_parameters():
                if p.requires_grad:
                    torch.testing.assert_close(grads[n], p.grad.to(grads[n].dtype), atol=1e-4, rtol=1e-3)
            model.zero_grad()
    finally:
        logprobs._FrozenHeadLogps.apply = original
    assert calls  # the frozen-head path ran
