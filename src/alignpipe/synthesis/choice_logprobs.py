"""Log-probabilities of fixed answers after a pre-filled assistant turn (logprob verdicts of LLM judges).

`choice_logprobs(model, tokenizer, texts, prefix, choices)` reads, for each already-formatted chat text
(ending with the assistant generation prompt), how likely the model is to continue `prefix` with each
of `choices` (e.g. prefix `"Verdict:"`, choices `[" A", " B", " tie"]`). No sampling, no parsing.

Tokenization. `prefix + choice` is tokenized as one string for every choice; the longest token prefix
shared by all of them (capped so that every choice keeps at least one token) is the context the model
reads, and each choice's remaining tokens are its answer. The model thus sees the tokens it would have
written itself: with SmolLM2, `"Score: 7"` is `Score | : | ' ' | 7`, so the context ends with the space token
and the answers are single digits.

Multi-token answers and answers that are token prefixes of others (`" 1"` and `" 10"` with digit tokens:
`1` and `1 0`) are handled exactly: the remaining tokens form a trie; every inner node of it costs one
extra one-or-few-token forward on the KV cache, batched over rows. An answer's log-probability is the sum
of its tokens' log-probabilities, plus, when the answer is an inner node (`1` on the way to `1 0`),
`log(1 - P(any token that continues it into a longer answer))`: "1" means `1` not followed by `0`.

Steps (`then`). After each step a callback may give a row a new, longer assistant prefix (the rubric
judge appends the chosen score and the next criterion's `Score (<key>):`); only the new tokens are run,
on the KV cache, so a multi-criterion verdict costs about one prompt forward. Tokens of an earlier step that
the new prefix does not keep are hidden by the attention mask; positions follow the visible tokens.

Batches are sorted by length and left-padded; later steps are right-padded with explicit masks and
positions; only the needed positions get logits. `precision="auto"` (default) is bf16 where the device has it natively, else fp32; bf16 runs under bf16
autocast (log-softmax in fp32). A batch that fails yields `BackendError`s for its rows only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from alignpipe.precision import PRECISIONS, resolve_precision
from alignpipe.progress import progress

log = logging.getLogger(__name__)

# then(row, step, logprobs of this step) -> the row's next full assistant prefix, or None to stop the row
ThenFn = Callable[[int, int, dict[str, float]], str | None]


def resolve_choices(tokenizer: Any, prefix: str, choices: Sequence[str]) -> tuple[list[int], list[tuple[int, ...]]]:
    """The prefix's context tokens and each choice's answer tokens (see the module docstring)."""
    if not choices:
        raise ValueError("no choices")
    seqs = [tokenizer(prefix + c, add_special_tokens=False)["input_ids"] for c in choices]
    common = 0
    while all(len(s) > common for s in seqs) and len({s[common] for s in seqs}) == 1:
        common += 1
    common = min(common, min(len(s) for s in seqs) - 1)
    if common < 0:
        raise ValueError(f"prefix {prefix!r} and choices {list(choices)!r} tokenize to nothing")
    answers = [tuple(s[common:]) for s in seqs]
    if len(set(answers)) != len(answers):
        raise ValueError(f"choices {list(choices)!r} are not distinct after {prefix!r}")
    return list(seqs[0][:common]), answers


def inner_paths(answers: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Non-empty token paths after which a distribution is needed (strict prefixes of some answer)."""
    return sorted({a[:k] for a in answers for k in range(1, len(a))}, key=lambda p: (len(p), p))


def combine(answers: Sequence[tuple[int, ...]], dists: dict[tuple[int, ...], torch.Tensor]) -> list[float]:
    """Each answer's log-probability as a complete answer, from log-softmax vectors after each path
    (`dists[()]` after the context)."""
    out = []
    for a in answers:
        lp = sum(float(dists[a[:k]][a[k]]) for k in range(len(a)))
        longer = {b[len(a)] for b in answers if len(b) > len(a) and b[: len(a)] == a}
        if longer:
            p_cont = sum(math.exp(float(dists[a][t])) for t in longer)
            lp += math.log(max(1.0 - p_cont, 1e-30))
        out.append(lp)
    return out


class _Rows:
    """A batch of sequences on one KV cache: the visible tokens of each row and their cache columns."""

    def __init__(self, model: Any, pad_id: int) -> None:
        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        self.ids: list[list[int]] = []
        self.cols: list[list[int]] = []

    def start(self, rows: list[list[int]]) -> torch.Tensor:
        """Forward the left-padded rows; log-softmax after each row's last token, [B, V]."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[b, width - len(r):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=pos.to(self.device), use_cache=True, logits_to_keep=1)
        self.cache, self.mask = out.past_key_values, mask
        self.ids = [list(r) for r in rows]
        self.cols = [list(range(width - len(r), width)) for r in rows]
        return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)

    def extend(self, new: list[list[int]], keep: bool) -> torch.Tensor:
        """Run each row's `new` tokens after its visible ones (right-padded); log-softmax after each row's
        last new token. `keep=False` is a probe: its columns are hidden again afterwards."""
        assert self.mask is not None
        start, width = self.mask.shape[1], max(1, max(len(r) for r in new))
        ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        ext = torch.zeros((len(new), width), dtype=torch.long)
        for b, r in enumerate(new):
            if r:
                ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
                ext[b, : len(r)] = 1
        full = torch.cat([self.mask, ext], dim=1)
        pos = (full.cumsum(-1) - 1).clamp(min=0)[:, start:]
        out = self.model(input_ids=ids.to(self.device), attention_mask=full.to(self.device),
                         position_ids=pos.to(self.device), past_key_values=self.cache, use_cache=True,
                         logits_to_keep=width)
        self.cache = out.past_key_values
        last = torch.tensor([max(len(r), 1) - 1 for r in new], device=out.logits.device)
        logits = out.logits[torch.arange(len(new), device=last.device), last, :]
        if keep:
            self.mask = full
            for b, r in enumerate(new):
                self.ids[b] += r
                self.cols[b] += list(range(start, start + len(r)))
        else:
            self.mask = torch.cat([self.mask, torch.zeros_like(ext)], dim=1)
        return torch.log_softmax(logits.float(), dim=-1)

    def retarget(self, b: int, target: list[int]) -> list[int]:
        """Make row b's visible tokens a prefix of `target` (hiding the rest); the tokens still to run
        (at least one, so that the distribution after `target` can be read)."""
        assert self.mask is not None
        keep = 0
        while keep < min(len(self.ids[b]), len(target)) and self.ids[b][keep] == target[keep]:
            keep += 1
        keep = min(keep, len(target) - 1)
        for c in self.cols[b][keep:]:
            self.mask[b, c] = 0
        self.ids[b], self.cols[b] = self.ids[b][:keep], self.cols[b][:keep]
        return target[keep:]


def _read_step(rows: _Rows, last: torch.Tensor, plans: list[tuple[list[int], list[tuple[int, ...]]]]
               ) -> list[list[float]]:
    """The answers' log-probs of every row, given the distribution after each row's context (`last`);
    runs one probe forward per inner trie depth/path index where needed."""
    dists: list[dict[tuple[int, ...], torch.Tensor]] = [{(): last[b]} for b in range(len(plans))]
    paths = [inner_paths(answers) for _, answers in plans]
    for k in range(max((len(p) for p in paths), default=0)):
        probe = [list(p[k]) if k < len(p) else [] for p in paths]
        out = rows.extend(probe, keep=False)
        for b, p in enumerate(paths):
            if k < len(p):
                dists[b][p[k]] = out[b]
    return [combine(answers, dists[b]) for b, (_, answers) in enumerate(plans)]


@torch.no_grad()
def choice_logprobs(model: Any, tokenizer: Any, texts: list[str], prefix: str | Sequence[str],
                    choices: Sequence[str], *, then: ThenFn | None = None, batch_size: int = 16,
                    precision: str = "auto", description: str = "scoring choices",
                    error: Callable[[str], str] = str) -> list[list[dict[str, float]] | str]:
    """Per text, one `{choice: log P}` dict per step (see the module docstring); `error(reason)` builds
    the slot of a row whose batch failed. `prefix` is one string or one per text."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    prefixes = [prefix] * len(texts) if isinstance(prefix, str) else list(prefix)
    if len(prefixes) != len(texts):
        raise ValueError(f"{len(prefixes)} prefixes for {len(texts)} texts")
    resolved: dict[str, tuple[list[int], list[tuple[int, ...]]]] = {}

    def plan(p: str) -> tuple[list[int], list[tuple[int, ...]]]:
        if p not in resolved:
            resolved[p] = resolve_choices(tokenizer, p, choices)
        return resolved[p]

    heads = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(heads[i]) + len(prefixes[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device_type = next(model.parameters()).device.type
    precision = resolve_precision(precision, device_type)
    was_training = model.training
    model.eval()
    out: list[list[dict[str, float]] | str] = [error("not scored")] * len(texts)
    with progress() as bar:
        task = bar.add_task(description, total=len(texts), info=precision)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            try:
                with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    results = _run_batch(model, pad_id, [heads[i] for i in batch], [prefixes[i] for i in batch],
                                         batch, list(choices), plan, then)
                for i, res in zip(batch, results, strict=True):
                    out[i] = res
            except Exception as exc:  # noqa: BLE001 - a failed batch is recorded per row, never raised
                log.warning("choice scoring failed for a batch of %d: %s: %s", len(batch), type(exc).__name__, exc)
                for i in batch:
                    out[i] = error(f"choice scoring failed: {type(exc).__name__}: {exc}")
            bar.update(task, advance=len(batch))
    model.train(was_training)
    return out


def _run_batch(model: Any, pad_id: int, heads: list[list[int]], prefixes: list[str], index: list[int],
               choices: list[str], plan: Callable[[str], tuple[list[int], list[tuple[int, ...]]]],
               then: ThenFn | None) -> list[list[dict[str, float]]]:
    rows = _Rows(model, pad_id)
    plans = [plan(p) for p in prefixes]
    last = rows.start([h + ctx for h, (ctx, _) in zip(heads, plans, strict=True)])
    results: list[list[dict[str, float]]] = [[] for _ in heads]
    active = list(range(len(heads)))
    step = 0
    while True:
        values = _read_step(rows, last, plans)
        nxt: dict[int, str] = {}
        for b in active:
            lp = dict(zip(choices, values[b], strict=True))
            results[b].append(lp)
            new_prefix = then(index[b], step, lp) if then is not None else None
            if new_prefix is not None:
                nxt[b] = new_prefix
        if not nxt:
            return results
        new: list[list[int]] = []
        for b in range(len(heads)):
            if b in nxt:
                plans[b] = plan(nxt[b])
                new.append(rows.retarget(b, heads[b] + plans[b][0]))
            else:
                new.append([])
        last = rows.extend(new, keep=True)
        active, step = sorted(nxt), step + 1
