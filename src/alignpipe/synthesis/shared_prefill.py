"""k samples per prompt from one prefill of the prompt.

Sampling k completions of a prompt by repeating the prompt k times runs the prompt through the model k
times. Here the distinct prompts of a batch are run once (all tokens but the last, left-padded), their KV
cache is expanded to one row per sample, and `model.generate` continues from it: the prompt's last token
is the one uncached input, so the first sampled token still comes from a forward pass inside `generate`.

Each sample row sees the same left padding, positions (attention-mask cumsum, as `generate` derives
them) and batch width as in the repeated-prompt batch, so greedy decoding gives the same tokens.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from alignpipe.models import base_model


def supports_shared_prefill(model: Any) -> bool:
    """False for peft prompt-learning adapters (prefix tuning): they inject their own KV cache, which a
    cache handed to the model would conflict with."""
    config = getattr(model, "active_peft_config", None)
    return not getattr(config, "is_prompt_learning", False)


def _forward_params(model: Any) -> set[str]:
    return set(inspect.signature(base_model(model).forward).parameters)


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    try:  # with its config the cache knows sliding-window layers
        return DynamicCache(config=base_model(model).config)
    except TypeError:  # older transformers
        return DynamicCache()


@torch.no_grad()
def generate_shared(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    repeats: list[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: list[int],
) -> list[tuple[list[int], bool]]:
    """`repeats[i]` continuations of each already-formatted `texts[i]`, from one prefill of each text.

    Returns rows in order: text 0's samples, then text 1's, ...; each row is (new token ids before the
    first EOS, whether an EOS ended it), as `transformers_backend.generate_batch`. Sampling draws from
    torch's global RNG: seed it before the call.
    """
    from alignpipe.synthesis.transformers_backend import generate_batch, split_at_eos

    if len(texts) != len(repeats) or any(r < 1 for r in repeats):
        raise ValueError("one repeat count >= 1 per text is needed")
    device = next(model.parameters()).device
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = padding_side
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    if ids.shape[1] < 2:  # nothing to prefill before the last token
        return generate_batch(model, tokenizer, [t for t, r in zip(texts, repeats, strict=True) for _ in range(r)],
                              max_new_tokens, temperature, top_p, eos_ids)
    params = _forward_params(model)
    # the KV-cache argument: `cache` from transformers 5.x on (`past_key_values` is a deprecated alias there)
    cache_kw = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # the prefill's logits are not used
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate derives them
    cache = _new_cache(model)
    model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True,
          **{cache_kw: cache}, **extra)
    index = torch.repeat_interleave(torch.arange(len(texts), device=device),
                                    torch.tensor(repeats, device=device))
    cache.batch_select_indices(index)  # k rows per prompt: copies of the prompt's keys and values
    greedy = temperature == 0
    out = model.generate(
        input_ids=ids[index], attention_mask=mask[index], **{cache_kw: cache}, max_new_tokens=max_new_tokens,
        do_sample=not greedy, temperature=None if greedy else temperature, top_p=None if greedy else top_p,
        top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids,
    )
    return split_at_eos(out[:, ids.shape[1]:].tolist(), eos_ids)
