"""Tokenising training examples into right-padded `[prompt | completion (+EOS) | pad]` batches."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, truncated: bool,
           max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and completion mask. Prompt and completion are tokenised separately, as generation
    produced them; EOS is appended unless the completion was cut off. Over-long rows lose prompt tokens
    from the left first, so the completion (what the loss reads) is kept whole where possible."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if not truncated and tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    completion_ids = completion_ids[: max_length - 1]
    prompt_ids = prompt_ids[-(max_length - len(completion_ids)) :]
    return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    completion = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        completion[i, : len(ids)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}
