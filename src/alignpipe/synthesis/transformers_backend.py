"""Batched generation with transformers: k samples per prompt, left padding, the model's chat template."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignpipe.data.chat import format_prompt
from alignpipe.progress import progress
from alignpipe.records import Candidate, Prompt


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    samples_per_prompt: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    seed: int = 0,
    source: dict | None = None,
    description: str = "generating",
) -> list[Candidate]:
    """`samples_per_prompt` completions per prompt; temperature 0 means greedy.

    Rows are sorted by prompt length so a batch pads little; the output order is prompt order, then
    sample index. Same seed, same model, same machine: same completions.
    """
    was_training = model.training
    model.eval()
    texts = [format_prompt(tokenizer, p.prompt) for p in prompts]
    rows = [(i, j) for i in range(len(prompts)) for j in range(samples_per_prompt)]
    rows.sort(key=lambda r: len(texts[r[0]]))
    eos_ids = _eos_ids(model, tokenizer)
    results: dict[tuple[int, int], Candidate] = {}
    generator_seed = torch.Generator().manual_seed(seed)
    with progress() as bar:
        task = bar.add_task(description, total=len(rows), info="")
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator_seed)))
            outputs = generate_batch(model, tokenizer, [texts[i] for i, _ in batch], max_new_tokens,
                                     temperature, top_p, eos_ids)
            for (i, j), (body, ended) in zip(batch, outputs, strict=True):
                results[(i, j)] = Candidate(
                    prompt_id=prompts[i].id, id=f"{prompts[i].id}/{j}",
                    completion=tokenizer.decode(body, skip_special_tokens=True),
                    source=dict(source or {}, temperature=temperature, top_p=top_p),
                    num_tokens=len(body) + (1 if ended else 0), truncated=not ended,
                )
            bar.update(task, advance=len(batch))
    model.train(was_training)
    return [results[(i, j)] for i in range(len(prompts)) for j in range(samples_per_prompt)]


@torch.no_grad()
def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_ids: list[int] | None = None,
) -> list[tuple[list[int], bool]]:
    """One continuation per already-formatted text, as one left-padded batch (temperature 0: greedy).

    Returns, per text, the new token ids before the first EOS and whether an EOS ended the text.
    Sampling draws from torch's global RNG: seed it before the call for reproducible samples.
    """
    eos_ids = _eos_ids(model, tokenizer) if eos_ids is None else eos_ids
    greedy = temperature == 0
    device = next(model.parameters()).device
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    finally:
        tokenizer.padding_side = padding_side
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=not greedy,
        temperature=None if greedy else temperature, top_p=None if greedy else top_p, top_k=None,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids,
    )
    results = []
    for tokens in out[:, enc["input_ids"].shape[1] :].tolist():
        ended = [n for n, t in enumerate(tokens) if t in eos_ids]
        results.append((tokens[: ended[0]] if ended else tokens, bool(ended)))
    return results


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
