"""Chat formatting shared by generation and training, so both see the same token sequence."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def format_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """The prompt as the model sees it: the chat template with a generation prompt, or the raw text
    for tokenizers without a chat template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text
