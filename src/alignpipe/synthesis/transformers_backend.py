"""Batched generation with transformers: k samples per prompt, left padding, the model's chat template.

With k > 1 samples per prompt, each prompt is prefilled once and its KV cache shared by its k samples
(`alignpipe.synthesis.shared_prefill`); `shared_prefill=False` repeats the prompt k times instead.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignpipe.data.chat import format_messages, format_prompt
from alignpipe.killpoints import killpoint
from alignpipe.progress import progress
from alignpipe.records import Candidate, Prompt
from alignpipe.synthesis.shared_prefill import generate_shared, supports_shared_prefill


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> str:
    """The prompt as training renders it: a multi-turn prompt (`meta["messages"]`) keeps its turns."""
    if prompt.meta.get("messages"):
        return format_messages(tokenizer, prompt.meta["messages"])
    return format_prompt(tokenizer, prompt.prompt)


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
    shared_prefill: bool = True,
) -> list[Candidate]:
    """`samples_per_prompt` completions per prompt; temperature 0 means greedy.

    Rows (prompt, sample) are sorted by prompt length so a batch pads little; `batch_size` counts rows.
    The output order is prompt order, then sample index. Same seed, same model, same machine: same
    completions. With `shared_prefill` (and k > 1) the rows of a prompt within a batch share one prefill
    of the prompt; their tokens are the same as without it under greedy decoding.
    """
    was_training = model.training
    model.eval()
    texts = [render_prompt(tokenizer, p) for p in prompts]
    rows = [(i, j) for i in range(len(prompts)) for j in range(samples_per_prompt)]
    # stable: a prompt's rows stay together, so a batch holds few distinct prompts
    rows.sort(key=lambda r: len(texts[r[0]]))
    shared = shared_prefill and samples_per_prompt > 1 and supports_shared_prefill(model)
    eos_ids = _eos_ids(model, tokenizer)
    results: dict[tuple[int, int], Candidate] = {}
    generator_seed = torch.Generator().manual_seed(seed)
    with progress() as bar:
        task = bar.add_task(description, total=len(rows), info="")
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator_seed)))
            if shared:  # a prompt's rows are contiguous in `batch`, as generate_shared returns them
                distinct = list(dict.fromkeys(i for i, _ in batch))
                counts = [sum(1 for i, _ in batch if i == d) for d in distinct]
                outputs = generate_shared(model, tokenizer, [texts[i] for i in distinct], counts, max_new_tokens,
                                          temperature, top_p, eos_ids)
            else:
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
            killpoint(f"generate:{description}:{start // batch_size}")
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
    return split_at_eos(out[:, enc["input_ids"].shape[1] :].tolist(), eos_ids)


def split_at_eos(rows: list[list[int]], eos_ids: list[int]) -> list[tuple[list[int], bool]]:
    """Per generated row: the tokens before the first EOS, and whether an EOS came."""
    results = []
    for tokens in rows:
        ended = [n for n, t in enumerate(tokens) if t in eos_ids]
        results.append((tokens[: ended[0]] if ended else tokens, bool(ended)))
    return results


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
