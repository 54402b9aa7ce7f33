"""Reward models: a pointwise judge over any local sequence classifier, and Bradley-Terry training.

`RewardModelJudge(model_dir)` scores chat-formatted `(prompt, completion)` with an
`AutoModelForSequenceClassification` (num_labels=1), batched and sorted by length.

Training (`train_reward_model`) keeps the backbone **frozen** and fits only the scalar head: the hidden
state at the last non-pad token (exactly what `*ForSequenceClassification` pools) is computed once per
sequence, then the head `r = w . h` is fitted on those features with the Bradley-Terry loss
(methods.md 2.7) by full-batch L-BFGS. The result is saved as a plain `*ForSequenceClassification`
directory (backbone + trained `score` weight), loadable by transformers alone and by `RewardModelJudge`.
A frozen backbone is what fits a few minutes on two CPU cores: one forward pass per sequence, no backward.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from alignpipe import AlignpipeError
from alignpipe.records import Candidate, Judgment, Prompt

META_FILE = "alignpipe_rm.json"


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float | None = None,
            center_coef: float = 0.0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """`mean[-logsigmoid(r_w - r_l - m)] + eta * mean((r_w + r_l)^2)` (weighted mean when `weight` is given)."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    per = -F.logsigmoid(diff)
    loss = per.mean() if weight is None else (per * weight).sum() / weight.sum()
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected).pow(2).mean()
    return loss


def pair_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs with r_chosen > r_rejected; an exact tie counts half."""
    wins = (r_chosen > r_rejected).double() + 0.5 * (r_chosen == r_rejected).double()
    return float(wins.mean()) if wins.numel() else float("nan")


# ---------------------------------------------------------------- formatting and features


def format_conversation(tokenizer: Any, prompt: Prompt, completion: str) -> str:
    messages = list(prompt.meta.get("messages") or [{"role": "user", "content": prompt.prompt}])
    messages.append({"role": "assistant", "content": completion})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return f"{prompt.prompt}\n{completion}"


def load_sequence_classifier(model_dir: str | Path, **overrides: Any) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a local directory, in eval mode, with a pad token the pooling can see."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from alignpipe.models import load_tokenizer

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise AlignpipeError(f"reward model {model_dir} is not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or []) and config.num_labels != 1:
        raise AlignpipeError(f"reward model {model_dir} has {config.num_labels} labels; a reward model has one "
                             "(num_labels=1)")
    tokenizer = load_tokenizer(path)
    tokenizer.truncation_side = "left"  # keep the end: the response being judged
    tokenizer.padding_side = "right"  # positions count from the first real token
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score weights newly initialized" is expected when training a head
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32,
                                                                   **overrides)
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def score_head(model: nn.Module) -> nn.Linear:
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear) or head.out_features != 1:
        raise AlignpipeError(f"{type(model).__name__} has no scalar linear head (score/classifier) to train")
    return head


def _batches(tokenizer: Any, texts: list[str], max_length: int, batch_size: int):
    """(indices, encoded batch) in order of token length, so that a batch carries little padding."""
    special = not getattr(tokenizer, "chat_template", None)
    ids = tokenizer(texts, add_special_tokens=special, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, padding=True, return_tensors="pt")
        yield idx, enc


def _last_index(input_ids: torch.Tensor, pad: int | None) -> torch.Tensor:
    if pad is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad).long()).argmax(-1)


def last_token_features(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        layer_counts: list[int] | None = None) -> torch.Tensor:
    """[B, K, H]: for each layer count n in `layer_counts` (default: all layers), the hidden state that a
    model truncated to its first n decoder layers would pool: `norm(h_n)` at the rightmost non-pad token,
    the pooling `*ForSequenceClassification` uses. All counts come from one forward pass."""
    backbone = getattr(model, model.base_model_prefix)
    total = model.config.num_hidden_layers
    counts = layer_counts or [total]
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    if any(n != total for n in counts):
        if not hasattr(backbone, "layers") or not hasattr(backbone, "norm"):
            raise AlignpipeError(f"{type(backbone).__name__}: choosing a layer needs `layers` and `norm` modules")
        for n in set(counts) - {total}:
            def hook(_m, _args, out, n=n):  # noqa: ANN001, ANN202
                captured[n] = out[0] if isinstance(out, tuple) else out
            hooks.append(backbone.layers[n - 1].register_forward_hook(hook))
    try:
        last_hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    last = _last_index(input_ids, model.config.pad_token_id)
    out = [last_hidden[rows, last] if n == total else backbone.norm(captured[n][rows, last]) for n in counts]
    return torch.stack(out, dim=1)


@torch.inference_mode()
def encode_features(model: nn.Module, tokenizer: Any, texts: list[str], max_length: int = 512,
                    batch_size: int = 8, layer_counts: list[int] | None = None, show: bool = False) -> torch.Tensor:
    """[N, K, H] last-token features of `texts` (see `last_token_features`)."""
    k = len(layer_counts or [0])
    out = torch.zeros(len(texts), k, model.config.get_text_config().hidden_size)
    from alignpipe.progress import progress

    with progress(transient=True) as bar:
        task = bar.add_task("features", total=len(texts), info="", visible=show)
        for idx, enc in _batches(tokenizer, texts, max_length, batch_size):
            out[idx] = last_token_features(model, enc["input_ids"], enc["attention_mask"], layer_counts).float()
            bar.update(task, advance=len(idx))
    return out


def truncate_layers(model: nn.Module, n: int) -> None:
    """Keep the first n decoder layers (in the module and in the config, so that it saves that way)."""
    backbone = getattr(model, model.base_model_prefix)
    if n == model.config.num_hidden_layers:
        return
    backbone.layers = nn.ModuleList(list(backbone.layers)[:n])
    for config in {id(c): c for c in (model.config, backbone.config)}.values():
        config.num_hidden_layers = n
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:n]


# ---------------------------------------------------------------- the judge


class RewardModelJudge:
    """PointwiseJudge: `scores={criterion: reward}` from a local sequence classifier (num_labels=1)."""

    def __init__(self, model_dir: str | Path, name: str | None = None, batch_size: int = 8,
                 max_length: int | None = None, criterion: str = "reward") -> None:
        self.model_dir = Path(model_dir)
        self.model, self.tokenizer = load_sequence_classifier(self.model_dir)
        meta_path = self.model_dir / META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.max_length = max_length or meta.get("max_length", 1024)
        self.name = name or f"reward-model:{self.model_dir.name}"
        self.batch_size, self.criterion = batch_size, criterion

    @torch.inference_mode()
    def rewards(self, texts: list[str]) -> list[float]:
        out = [math.nan] * len(texts)
        for idx, enc in _batches(self.tokenizer, texts, self.max_length, self.batch_size):
            logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            for i, v in zip(idx, logits[:, 0].float().tolist(), strict=True):
                out[i] = v
        return out

    def score(self, items: list[tuple[Prompt, Candidate]]) -> list[Judgment]:
        texts = [format_conversation(self.tokenizer, p, c.completion) for p, c in items]
        try:
            values: list[float] = self.rewards(texts)
            error = ""
        except Exception as exc:  # noqa: BLE001 - a failed batch is recorded per item, not raised
            values, error = [math.nan] * len(items), f"{type(exc).__name__}: {exc}"
        out = []
        for (p, c), v in zip(items, values, strict=True):
            j = Judgment(prompt_id=p.id, candidate_ids=[c.id], judge=self.name)
            if error:
                j.status, j.reason = "error", error
            elif not math.isfinite(v):
                j.status, j.reason = "invalid", "non-finite reward"
            else:
                j.scores, j.raw = {self.criterion: v}, repr(v)
            out.append(j)
        return out


# ---------------------------------------------------------------- Bradley-Terry head training


@dataclass
class HeadFit:
    weight: torch.Tensor  # [H] in raw feature space: r = weight . h
    l2: float
    layer_index: int = 0  # which of the candidate feature sets (layer counts) was chosen
    losses: list[float] = field(default_factory=list)  # training objective per L-BFGS evaluation
    train_loss: float = math.nan
    train_accuracy: float = math.nan
    selection: dict[str, float] = field(default_factory=dict)  # "k=..,l2=..": inner-holdout BT loss


def _fit_fixed(zc: torch.Tensor, zr: torch.Tensor, margin: torch.Tensor | None, l2: float, center: float,
               steps: int) -> tuple[torch.Tensor, list[float]]:
    w = torch.zeros(zc.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)
    losses: list[float] = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = bt_loss(zc @ w, zr @ w, margin, center) + l2 * w.pow(2).sum()
        loss.backward()
        losses.append(float(loss.detach()))
        return loss

    opt.step(closure)
    w = w.detach()
    losses.append(float(bt_loss(zc @ w, zr @ w, margin, center) + l2 * w.pow(2).sum()))  # the final objective
    return w, losses


def fit_bt_head(f_chosen: torch.Tensor, f_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                l2: float | None = None, center_coef: float = 0.0, steps: int = 200, seed: int = 0,
                l2_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)) -> HeadFit:
    """Fit `r = w . h` by Bradley-Terry on feature pairs, in float64, by full-batch L-BFGS.

    Features are [N, H], or [N, K, H] for K candidate feature sets (e.g. layers). With K > 1 or
    `l2=None`, the feature set and the L2 penalty are chosen by BT loss on a seeded 20% inner holdout of
    these pairs, then the head is refitted on all of them. Features are scaled by their per-dimension std
    only (no shift), which folds exactly into the weight (`w_raw = w_scaled / std`) with no bias term."""
    fc, fr = f_chosen.double(), f_rejected.double()
    if fc.dim() == 2:
        fc, fr = fc.unsqueeze(1), fr.unsqueeze(1)
    scale = torch.cat([fc, fr]).std(0).clamp_min(1e-6)  # [K, H]
    zc, zr = fc / scale, fr / scale
    m = None if margin is None else margin.double()
    grid = l2_grid if l2 is None else (l2,)
    selection: dict[str, float] = {}
    best = (0, grid[0])
    if len(grid) > 1 or zc.shape[1] > 1:
        perm = list(range(zc.shape[0]))
        random.Random(seed).shuffle(perm)
        cut = max(1, len(perm) // 5)
        held, fit = torch.tensor(perm[:cut]), torch.tensor(perm[cut:])
        best_loss = math.inf
        for k in range(zc.shape[1]):
            for cand in grid:
                w, _ = _fit_fixed(zc[fit, k], zr[fit, k], None if m is None else m[fit], cand, center_coef, steps)
                loss = float(bt_loss(zc[held, k] @ w, zr[held, k] @ w, None if m is None else m[held]))
                selection[f"k={k},l2={cand:g}"] = loss
                if loss < best_loss - 1e-12:
                    best_loss, best = loss, (k, cand)
    k, l2 = best
    w, losses = _fit_fixed(zc[:, k], zr[:, k], m, l2, center_coef, steps)
    rc, rr = zc[:, k] @ w, zr[:, k] @ w
    return HeadFit(weight=(w / scale[k]).float(), l2=l2, layer_index=k, losses=losses,
                   train_loss=float(bt_loss(rc, rr, m)), train_accuracy=pair_accuracy(rc, rr), selection=selection)


def split_pairs(pairs: list, train_fraction: float = 0.6, seed: int = 0) -> tuple[list, list]:
    """Seeded shuffle, then the first `train_fraction` for training and the rest for test."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    cut = int(round(len(pairs) * train_fraction))
    return [pairs[i] for i in order[:cut]], [pairs[i] for i in order[cut:]]


def _pair_features(model: nn.Module, tokenizer: Any, pairs: list, max_length: int, batch_size: int,
                   counts: list[int], cache: Path | None, show: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, K, H] features of chosen and of rejected. With `cache`, features are kept per text (keyed by
    model config, max_length and layer counts), so a re-run computes only texts it has not seen."""
    texts = [format_conversation(tokenizer, p, c.completion) for p, c, _ in pairs]
    texts += [format_conversation(tokenizer, p, r.completion) for p, _, r in pairs]
    if cache is None:
        feats = encode_features(model, tokenizer, texts, max_length, batch_size, counts, show)
        return feats[: len(pairs)], feats[len(pairs):]
    key = json.dumps([model.config.to_json_string(), max_length, counts])
    path = Path(cache) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"
    store: dict[str, torch.Tensor] = torch.load(path) if path.is_file() else {}
    digests = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    todo = sorted({d: t for d, t in zip(digests, texts, strict=True) if d not in store}.items())
    if todo:
        new = encode_features(model, tokenizer, [t for _, t in todo], max_length, batch_size, counts, show)
        store.update({d: f for (d, _), f in zip(todo, new, strict=True)})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(store, tmp)
        tmp.replace(path)
    feats = torch.stack([store[d] for d in digests])
    return feats[: len(pairs)], feats[len(pairs):]


def train_reward_model(backbone_dir: str | Path, train_pairs: list, out_dir: str | Path | None = None,
                       test_pairs: list | None = None, max_length: int = 512, batch_size: int = 8,
                       layers: int | list[int] | None = None, l2: float | None = None, center_coef: float = 0.0,
                       seed: int = 0, feature_cache: str | Path | None = None, show: bool = False) -> dict:
    """Frozen-backbone Bradley-Terry reward model on `(prompt, chosen, rejected)` triples.

    `layers`: None = all decoder layers; N = keep the first N; a list = candidate layer counts, chosen on
    an inner holdout of the training pairs (features for all of them come from one forward pass).
    The saved model keeps the chosen number of layers. Writes the model to `out_dir` (when given) and
    returns metrics, including test accuracy when `test_pairs` are given."""
    torch.manual_seed(seed)
    counts = sorted(set(layers)) if isinstance(layers, list | tuple) else [layers] if layers else None
    overrides = {"num_hidden_layers": max(counts)} if counts else {}
    model, tokenizer = load_sequence_classifier(backbone_dir, **overrides)
    counts = counts or [model.config.num_hidden_layers]
    head = score_head(model)
    t0 = time.perf_counter()
    fc, fr = _pair_features(model, tokenizer, train_pairs, max_length, batch_size, counts, feature_cache, show)
    if test_pairs:
        tc, tr = _pair_features(model, tokenizer, test_pairs, max_length, batch_size, counts, feature_cache, show)
    t1 = time.perf_counter()
    fit = fit_bt_head(fc, fr, l2=l2, center_coef=center_coef, seed=seed)
    t2 = time.perf_counter()
    truncate_layers(model, counts[fit.layer_index])
    with torch.no_grad():
        head.weight.copy_(fit.weight.unsqueeze(0))
        if head.bias is not None:
            head.bias.zero_()
    metrics: dict[str, Any] = {
        "method": "frozen backbone; Bradley-Terry linear head on the last non-pad token's final hidden state",
        "backbone": str(backbone_dir), "layers": counts[fit.layer_index], "layer_candidates": counts,
        "max_length": max_length, "l2": fit.l2, "inner_holdout_bt_loss": fit.selection,
        "center_coef": center_coef, "train_pairs": len(train_pairs), "train_loss": fit.train_loss,
        "train_accuracy": fit.train_accuracy, "objective_start": fit.losses[0], "objective_end": fit.losses[-1],
        "feature_seconds": t1 - t0, "fit_seconds": t2 - t1,
    }
    if test_pairs:
        k = fit.layer_index
        rc, rr = tc[:, k] @ fit.weight, tr[:, k] @ fit.weight
        metrics.update(test_pairs=len(test_pairs), test_loss=float(bt_loss(rc.double(), rr.double())),
                       test_accuracy=pair_accuracy(rc, rr))
    if out_dir is not None:
        out = Path(out_dir)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / META_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
