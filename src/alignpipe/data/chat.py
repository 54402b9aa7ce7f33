"""Chat formatting shared by generation and training, so both see the same token sequence."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def format_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """The prompt as the model sees it: the chat template with a generation prompt, or the raw text
    for tokenizers without a chat template."""
    return format_messages(tokenizer, [{"role": "user", "content": text}])


def format_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """A whole conversation (system / user / assistant turns) with a generation prompt, through the
    chat template. Without a template: a lone user message is its raw text; longer conversations are
    `role: content` blocks ending with `assistant:`."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant:"
