"""Tokenising a whole conversation for instruction tuning: every assistant turn is a target, the rest context.

Why: a multi-turn demonstration teaches every assistant turn in it, each read after the turns before it as the
chat template renders them. The row is built turn by turn so that each assistant turn's tokens are exactly the
ones generation would produce after its context: the context is rendered with `format_messages` (generation
prompt included) and tokenised apart from the response, as `batching.encode` does for one turn; for a
[user, assistant] conversation the result is `encode`'s, token for token.

Between two assistant turns only the text the template adds after the earlier one is tokenised as new context:
the rendering of the later context must begin with the earlier one, followed (after any whitespace) by the
earlier response; what the template writes after that response, less the EOS text already emitted, is the new
context (for ChatML: the newline after `<|im_end|>`, then the next user turn and the assistant header). A
template that re-renders earlier turns differently (one that drops earlier reasoning, say) cannot be followed
turn by turn: the row then restarts from the later context rendered whole, and the assistant turns before it
count as context (mask 0).

Without a chat template, `format_messages` writes a lone user turn as its raw text but longer conversations as
`role: content` blocks; a conversation with more than one assistant turn uses the blocks from its first turn,
so that each context continues the one before.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from alignpipe.data.chat import format_messages


def _render(tokenizer: PreTrainedTokenizerBase, turns: list[dict[str, str]], blocks: bool) -> str:
    if blocks and len(turns) == 1 and turns[0]["role"] == "user" and not getattr(tokenizer, "chat_template", None):
        return f"user: {turns[0]['content']}\n\nassistant:"  # format_messages' block form, for one turn
    return format_messages(tokenizer, turns)


def _new_context(context: str, previous: tuple[str, str] | None, eos_text: str) -> str | None:
    """The text `context` adds after the previous assistant turn (its context and response), or None when
    `context` does not continue it."""
    if previous is None:
        return context
    before, response = previous
    if not context.startswith(before):
        return None
    rest = context[len(before):]
    for text in dict.fromkeys((response, response.strip())):  # as written, then as a trimming template writes it
        at = rest.find(text)
        if at >= 0 and not rest[:at].strip():
            tail = rest[at + len(text):]
            return tail.removeprefix(eos_text) if eos_text else tail
    return None


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]],
                        max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 mask that is 1 on every assistant turn's tokens and the EOS after each, 0 elsewhere
    (system and user turns, template markup, assistant headers). Assistant turns before the first user turn are
    context. Over-long rows keep their last `max_length` tokens, except that, as in `encode`, a last assistant
    turn longer than `max_length - 1` tokens keeps its head after one context token."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    eos_text = tokenizer.eos_token if eos and tokenizer.eos_token else ""
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    targets = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > first_user]
    if not targets:
        raise ValueError("a conversation to train on needs an assistant turn after a user turn")
    blocks = len(targets) > 1
    ids: list[int] = []
    mask: list[int] = []
    last_start, previous = 0, None
    for j in targets:
        context = _render(tokenizer, messages[:j], blocks)
        new = _new_context(context, previous, eos_text)
        if new is None:  # the template rewrites earlier turns: start over from this context, whole
            ids, mask, new = [], [], context
        piece = tokenizer(new, add_special_tokens=False)["input_ids"]
        response = tokenizer(messages[j]["content"], add_special_tokens=False)["input_ids"] + eos
        last_start = len(ids) + len(piece)
        ids += piece + response
        mask += [0] * len(piece) + [1] * len(response)
        previous = (context, messages[j]["content"])
    if len(ids) <= max_length:
        return ids, mask
    keep = min(len(ids) - last_start, max_length - 1)  # the last turn, as `encode` keeps its completion
    head = max_length - keep
    return ids[:last_start][-head:] + ids[last_start:][:keep], mask[:last_start][-head:] + mask[last_start:][:keep]
