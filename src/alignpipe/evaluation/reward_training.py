"""`alignpipe train-reward-model`: a Bradley-Terry reward model from human preference pairs.

`train_reward_model_command` reads pairs (hh-rlhf or TRL format, `alignpipe.data.pairs.load_pairs`), splits
them by a seeded shuffle (`split_pairs`: the first `train_fraction` for training, the rest for test), trains,
and writes a plain `*ForSequenceClassification` directory (num_labels=1) that the judge spec
`reward-model:DIR` loads, with `metrics.json` (train/test accuracy and BT loss, pair counts, seconds) and
`split.json` (the pair ids of each side) beside it. Two methods:

- `head`: the backbone stays frozen; last-token features are computed once (cached) and a linear head is
  fitted by L-BFGS (`reward_model.train_reward_model`). One forward pass per sequence, no backward.
- `lora`: a LoRA adapter on every linear layer of the backbone and the linear score head, trained jointly
  with `-log sigmoid(r_chosen - r_rejected)` by AdamW for a few seeded epochs. The adapter is merged into
  the weights before saving, so the directory is a plain sequence classifier.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignpipe import AlignpipeError
from alignpipe.evaluation.reward_model import (
    META_FILE,
    _batches,
    bt_loss,
    format_conversation,
    load_sequence_classifier,
    pair_accuracy,
    score_head,
    split_pairs,
    train_reward_model,
)
from alignpipe.models import wrap_with_adapter
from alignpipe.progress import progress

METHODS = ("head", "lora")
METRICS_FILE, SPLIT_FILE = "metrics.json", "split.json"


def parse_layers(layers: str | int | list[int] | None, total: int) -> list[int] | None:
    """`"all"`/None -> None (every layer); `"N"` or `"N,M,..."` -> layer counts, each in 1..total."""
    if layers is None or layers == "all":
        return None
    if isinstance(layers, int):
        counts = [layers]
    elif isinstance(layers, str):
        try:
            counts = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise AlignpipeError(f"--layers expects 'all', N or N,M,... (layer counts), got {layers!r}") from None
    else:
        counts = list(layers)
    if not counts or any(not 1 <= n <= total for n in counts):
        raise AlignpipeError(f"--layers {layers}: each layer count must be between 1 and {total} "
                             "(the backbone's number of decoder layers)")
    return sorted(set(counts))


def _texts(tokenizer: Any, pairs: list) -> tuple[list[str], list[str]]:
    return ([format_conversation(tokenizer, p, c.completion) for p, c, _ in pairs],
            [format_conversation(tokenizer, p, r.completion) for p, _, r in pairs])


def _encode(tokenizer: Any, texts: list[str], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    special = not getattr(tokenizer, "chat_template", None)  # as reward_model._batches (and so the judge) encodes
    ids = tokenizer(texts, add_special_tokens=special, truncation=True, max_length=max_length)["input_ids"]
    enc = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


@torch.no_grad()
def _rewards(model: nn.Module, tokenizer: Any, texts: list[str], max_length: int, batch_size: int,
             device: torch.device, bar: Any = None, task: Any = None) -> torch.Tensor:
    out = torch.zeros(len(texts))
    for idx, enc in _batches(tokenizer, texts, max_length, batch_size):
        logits = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).logits
        out[idx] = logits[:, 0].float().cpu()
        if bar is not None:
            bar.update(task, advance=len(idx))
    return out


def _evaluate(model: nn.Module, tokenizer: Any, pairs: list, max_length: int, batch_size: int,
              device: torch.device, bar: Any, task: Any) -> tuple[float, float]:
    """(BT loss, accuracy) of `pairs` under the model."""
    chosen, rejected = _texts(tokenizer, pairs)
    r = _rewards(model, tokenizer, chosen + rejected, max_length, batch_size, device, bar, task)
    rc, rr = r[: len(pairs)], r[len(pairs):]
    return float(bt_loss(rc.double(), rr.double())), pair_accuracy(rc, rr)


def train_lora_reward_model(backbone_dir: str | Path, train_pairs: list, out_dir: str | Path | None = None,
                            test_pairs: list | None = None, max_length: int = 512, batch_size: int = 8,
                            layers: int | None = None, epochs: int = 2, lr: float = 1e-4,
                            head_lr: float | None = None, lora_r: int = 8, lora_alpha: int = 16,
                            center_coef: float = 0.0, seed: int = 0, show: bool = False) -> dict:
    """Bradley-Terry reward model with a LoRA adapter on the backbone's linear layers and a linear score
    head (zero-initialized: every pair starts as a tie, loss log 2), trained jointly by AdamW; `batch_size`
    pairs per step (2x sequences), gradient norm clipped at 1. The merged model is saved to `out_dir`."""
    import peft

    torch.manual_seed(seed)
    model, tokenizer = load_sequence_classifier(backbone_dir, **({"num_hidden_layers": layers} if layers else {}))
    head = score_head(model)
    with torch.no_grad():
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()
    backbone = getattr(model, model.base_model_prefix)
    targets = sorted({name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if isinstance(m, nn.Linear)})
    if not targets:
        raise AlignpipeError(f"{type(backbone).__name__} has no linear layers for a LoRA adapter")
    wrapped = wrap_with_adapter(model, peft.LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                       target_modules=targets))
    head.weight.requires_grad_(True)  # peft froze everything but the adapter; the head is not wrapped
    if head.bias is not None:
        head.bias.requires_grad_(True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    lora_params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    head_params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": lora_params, "lr": lr},
                             {"params": head_params, "lr": head_lr if head_lr is not None else 10 * lr}],
                            weight_decay=0.0)
    chosen, rejected = _texts(tokenizer, train_pairs)
    rng = random.Random(seed)
    steps_per_epoch = math.ceil(len(train_pairs) / batch_size)
    losses: list[float] = []
    t0 = time.perf_counter()
    with progress(transient=True) as bar:
        task = bar.add_task("reward model (LoRA)", total=epochs * steps_per_epoch, info="", visible=show)
        model.train()
        for _ in range(epochs):
            order = list(range(len(train_pairs)))
            rng.shuffle(order)
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = _encode(tokenizer, [chosen[i] for i in idx] + [rejected[i] for i in idx], max_length, device)
                r = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 0].float()
                loss = bt_loss(r[: len(idx)], r[len(idx):], center_coef=center_coef)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(lora_params + head_params, 1.0)
                opt.step()
                losses.append(float(loss.detach()))
                bar.update(task, advance=1, info=f"loss {losses[-1]:.4f}")
        model.eval()
        t1 = time.perf_counter()
        eval_pairs = len(train_pairs) + len(test_pairs or [])
        task = bar.add_task("scoring", total=2 * eval_pairs, info="", visible=show)
        train_loss, train_acc = _evaluate(model, tokenizer, train_pairs, max_length, batch_size, device, bar, task)
        metrics: dict[str, Any] = {
            "description": "LoRA on the backbone's linear layers and a linear head on the last non-pad token, "
                           "trained jointly with the Bradley-Terry loss (AdamW); adapter merged before saving",
            "backbone": str(backbone_dir), "layers": model.config.num_hidden_layers, "max_length": max_length,
            "lora_r": lora_r, "lora_alpha": lora_alpha, "lora_targets": targets, "epochs": epochs, "lr": lr,
            "head_lr": opt.param_groups[1]["lr"], "batch_size": batch_size, "steps": len(losses),
            "center_coef": center_coef, "device": device.type, "train_pairs": len(train_pairs),
            "train_loss": train_loss, "train_accuracy": train_acc, "objective_start": losses[0],
            "objective_end": sum(losses[-steps_per_epoch:]) / min(len(losses), steps_per_epoch),
            "train_seconds": t1 - t0,
        }
        if test_pairs:
            test_loss, test_acc = _evaluate(model, tokenizer, test_pairs, max_length, batch_size, device, bar, task)
            metrics.update(test_pairs=len(test_pairs), test_loss=test_loss, test_accuracy=test_acc)
    metrics["eval_seconds"] = time.perf_counter() - t1
    if out_dir is not None:
        merged = wrapped.merge_and_unload().to("cpu")
        out = Path(out_dir)
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / META_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def train_reward_model_command(pairs_path: str | Path, output: str | Path, backbone: str | Path | None = None,
                               method: str = "head", train_fraction: float = 0.6, seed: int = 0,
                               max_length: int = 128, batch_size: int = 8, layers: str | int | None = "all",
                               l2: float | None = None, center_coef: float = 0.0, limit: int | None = None,
                               fmt: str = "auto", epochs: int = 2, lr: float = 1e-4, lora_r: int = 8,
                               lora_alpha: int = 16, feature_cache: str | Path | None = None,
                               threads: int | None = None, show: bool = True) -> dict:
    """Load and split the pairs, train with `method` (head | lora), write the model, `metrics.json` and
    `split.json` to `output`; return the metrics. `feature_cache` (head method): a directory where
    last-token features are kept between runs (None: no cache)."""
    from alignpipe.data.pairs import load_pairs
    from alignpipe.models import embedded_model_dir, resolve_model_path

    start = time.perf_counter()
    if method not in METHODS:
        raise AlignpipeError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    if not 0.0 < train_fraction <= 1.0:
        raise AlignpipeError(f"--train-fraction must be in (0, 1], not {train_fraction}")
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise AlignpipeError(f"--output {out} exists and is not a directory")
    pairs = load_pairs(pairs_path, fmt=fmt, limit=limit)
    train, test = split_pairs(pairs, train_fraction, seed)
    if len(train) < 2:
        raise AlignpipeError(f"{pairs_path}: {len(pairs)} pairs leave {len(train)} for training "
                             f"(train fraction {train_fraction}); at least 2 are needed")
    backbone_dir = resolve_model_path(str(backbone)) if backbone else embedded_model_dir()
    from transformers import AutoConfig

    total = AutoConfig.from_pretrained(backbone_dir).get_text_config().num_hidden_layers
    counts = parse_layers(layers, total)
    if threads:
        torch.set_num_threads(threads)
    if method == "head":
        metrics = train_reward_model(backbone_dir, train, out, test_pairs=test or None, max_length=max_length,
                                     batch_size=batch_size, layers=counts, l2=l2, center_coef=center_coef,
                                     seed=seed, feature_cache=feature_cache, show=show)
        metrics["description"] = metrics.pop("method")
    else:
        if counts is not None and len(counts) > 1:
            raise AlignpipeError("--layers: the lora method takes 'all' or one layer count, not candidates")
        metrics = train_lora_reward_model(backbone_dir, train, out, test_pairs=test or None, max_length=max_length,
                                          batch_size=batch_size, layers=counts[0] if counts else None,
                                          epochs=epochs, lr=lr, lora_r=lora_r, lora_alpha=lora_alpha,
                                          center_coef=center_coef, seed=seed, show=show)
    metrics = {"method": method, "pairs_file": str(pairs_path), "pairs": len(pairs), **metrics,
               "split": f"seeded shuffle (seed {seed}) of {len(pairs)} pairs: first {len(train)} train, "
                        f"last {len(test)} test", "seed": seed, "train_fraction": train_fraction,
               "total_seconds": time.perf_counter() - start, "torch_threads": torch.get_num_threads(),
               "output": str(out)}
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    (out / SPLIT_FILE).write_text(json.dumps({"seed": seed, "train_fraction": train_fraction,
                                              "train": [p.prompt.id for p in train],
                                              "test": [p.prompt.id for p in test]}, indent=2) + "\n")
    return metrics
