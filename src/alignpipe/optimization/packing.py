"""Prefix-shared packing: the rows of a pair or group share their prompt, so compute it once.

A training batch holds rows `[prompt | completion]` in groups that share a prompt (a pair's chosen and
rejected rows, a group's K completions). Packed, each group becomes one row

    shared prefix | rest of row 1 | rest of row 2 | ...

where the shared prefix is the longest common prefix of the group's rows (the prompt, and more where the
completions begin alike) and each rest attends to the prefix and to itself only (a block attention mask),
with the position ids it has in its own row. Every position then has the hidden state it has in the plain
layout, and `index` maps each (row, position) of the plain layout to its place in the packed rows, so the
log-probs are gathered into the plain `[B, L-1]` layout that objectives read. A pair of 150 prompt and 2 x 50
completion tokens costs 250 positions instead of 400, and the rows pad only to the longest group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [G, T] one row per group, right-padded
    position_ids: torch.Tensor  # [G, T] each token's position in its own plain row
    attention: torch.Tensor  # [G, 1, T, T] bool: True where the query (dim 2) may read the key (dim 3)
    index: torch.Tensor  # [B, L] flat index into [G * T] of each plain (row, position); 0 off the row


def _common_prefix(rows: list[list[int]]) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        token = rows[0][i]
        if any(r[i] != token for r in rows[1:]):
            return i
    return n


def pack_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, groups: list[list[int]],
                pad_id: int = 0) -> PackedBatch:
    """Pack the right-padded rows `input_ids` [B, L] (lengths from `attention_mask`) by `groups`: lists of row
    indices that share a prompt; every row in exactly one group."""
    lengths = attention_mask.sum(-1).tolist()
    rows = [input_ids[r, : lengths[r]].tolist() for r in range(input_ids.shape[0])]
    packed_rows, positions, spans = [], [], []  # spans: per group (prefix length, [(row, start, length)])
    for group in groups:
        prefix = _common_prefix([rows[r] for r in group])
        tokens, pos, branches = list(rows[group[0]][:prefix]), list(range(prefix)), []
        for r in group:
            rest = rows[r][prefix:]
            branches.append((r, len(tokens), len(rest)))
            tokens += rest
            pos += range(prefix, prefix + len(rest))
        packed_rows.append(tokens)
        positions.append(pos)
        spans.append((prefix, branches))
    width = max(len(t) for t in packed_rows)
    g = len(groups)
    ids = torch.full((g, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((g, width), dtype=torch.long)
    # a pad reads only itself: a query that may read nothing would give NaN in the attention softmax
    attention = torch.eye(width, dtype=torch.bool).repeat(g, 1, 1, 1)
    index = torch.zeros(input_ids.shape, dtype=torch.long)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for k, (tokens, pos, (prefix, branches)) in enumerate(zip(packed_rows, positions, spans, strict=True)):
        ids[k, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        position_ids[k, : len(pos)] = torch.tensor(pos, dtype=torch.long)
        mask = attention[k, 0]
        mask[:prefix, :prefix] = causal[:prefix, :prefix]
        for r, start, n in branches:
            mask[start : start + n, :prefix] = True
            mask[start : start + n, start : start + n] = causal[:n, :n]
            index[r, :prefix] = k * width + torch.arange(prefix)
            index[r, prefix : prefix + n] = k * width + torch.arange(start, start + n)
    return PackedBatch(ids.to(input_ids.device), position_ids.to(input_ids.device),
                       attention.to(input_ids.device), index.to(input_ids.device))


def attention_for(model_config: object, attention: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The packed mask in the form the model's attention reads a custom 4D mask: bool for SDPA, additive for
    eager; None where a custom mask is not supported (flash attention reads only padding masks)."""
    impl = getattr(model_config, "_attn_implementation", None) or "eager"
    if impl == "sdpa":
        return attention
    if impl == "eager":
        return torch.zeros(attention.shape, dtype=dtype, device=attention.device).masked_fill(
            ~attention, torch.finfo(dtype).min)
    return None
