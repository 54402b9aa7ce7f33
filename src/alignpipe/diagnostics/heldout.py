"""Held-out metrics of a policy, measured before the first round and after the last.

- tasks with a verifier: greedy accuracy of generated answers;
- preference tasks: the share of held-out human pairs whose chosen response the policy gives the higher
  length-normalised log-probability (reference-free, so it reads the same for every objective);
- instruction data: the completion loss of the held-out demonstrations (mean NLL per assistant token, over
  every assistant turn) and its perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from alignpipe.config import OptimizationConfig
from alignpipe.optimization.batching import encode
from alignpipe.optimization.conversation import encode_conversation
from alignpipe.optimization.scoring import completion_logps
from alignpipe.records import Prompt


def paired_difference(before: list[float], after: list[float]) -> dict[str, float]:
    """Mean of after - before on the same items, with a normal 95% interval of the paired difference."""
    d = [a - b for a, b in zip(after, before, strict=True)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    half = 1.96 * math.sqrt(var / n)
    return {"difference": mean, "ci95_low": mean - half, "ci95_high": mean + half}


def pair_preference(model, tokenizer, prompts: list[Prompt], chat: Callable[[Prompt], str],  # noqa: ANN001
                    max_length: int = 512) -> dict[str, Any]:
    """Per held-out pair, 1.0 when avg logp(chosen) > avg logp(rejected) under `model`, else 0.0."""
    rows = []
    for p in prompts:
        chosen, rejected = p.meta["responses"][0]["completion"], p.meta["responses"][1]["completion"]
        rows += [encode(tokenizer, chat(p), chosen, False, max_length),
                 encode(tokenizer, chat(p), rejected, False, max_length)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    values = completion_logps(model, rows, pad, OptimizationConfig(batch_size=4, max_length=max_length),
                              "held-out pairs")
    means = [v.sum().item() / max(len(v), 1) for v in values]
    correct = [float(means[2 * i] > means[2 * i + 1]) for i in range(len(prompts))]
    return {"accuracy": sum(correct) / max(len(correct), 1), "n": len(correct), "correct": correct,
            "metric": "pair_preference"}




def heldout_perplexity(model, tokenizer, prompts: list[Prompt], max_length: int = 512) -> dict[str, Any]:  # noqa: ANN001
    """Completion loss of the held-out demonstrations (each prompt's turns plus its gold response): the mean
    negative log-likelihood per assistant token over all of them (`loss`), `perplexity` = exp(loss), and each
    demonstration's own per-token loss (`example_loss`, for a paired interval of before vs after)."""
    from alignpipe.instantiation.sft import prompt_turns
    from alignpipe.synthesis.sources import gold_response

    rows = [encode_conversation(tokenizer, prompt_turns(p) + [{"role": "assistant", "content": gold_response(p) or ""}],
                                max_length) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    values = completion_logps(model, rows, pad, OptimizationConfig(batch_size=4, max_length=max_length),
                              "held-out loss")
    tokens = sum(len(v) for v in values)
    loss = -sum(v.sum().item() for v in values) / max(tokens, 1)
    return {"accuracy": None, "n": len(prompts), "loss": loss, "perplexity": math.exp(loss), "tokens": tokens,
            "example_loss": [-v.sum().item() / max(len(v), 1) for v in values], "correct": [],
            "metric": "perplexity"}
