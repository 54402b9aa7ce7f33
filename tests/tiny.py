"""Helpers shared by the tests that train or probe the tiny Llama (see conftest.py's `tiny_model_path`,
`tok` and `one_thread` fixtures): arithmetic chat prompts and the pair / point / group sets built on them,
a seeded LoRA policy, random weight perturbation, round contexts, plain log-prob references, and a recorder
of the trainer's per-step losses.

Imported as `from tiny import ...` (pytest puts this folder on sys.path, as for conftest).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import torch

import alignpipe.optimization.trainer as trainer
from alignpipe.config import AdapterConfig
from alignpipe.models import attach_adapter, load_policy
from alignpipe.optimization.batching import collate, encode
from alignpipe.optimization.instances import Instances
from alignpipe.optimization.providers import RoundContext
from alignpipe.records import GroupExample, PairExample, PointExample

MAX_LENGTH = 64
CPU = torch.device("cpu")
PROBLEMS = [(12, 34), (25, 17), (40, 29), (63, 11), (18, 18), (51, 26), (33, 45), (70, 14)]


# --- data -------------------------------------------------------------------------------------------------

def prompt(tok, a: int, b: int) -> str:
    """`What is a + b?` as a one-turn chat, ready for the assistant's answer."""
    return tok.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}?"}], tokenize=False,
                                   add_generation_prompt=True)


def arithmetic_pairs(tok, problems=PROBLEMS) -> list[PairExample]:
    """Chosen = the right sum, rejected = a wrong one of the same length."""
    return [PairExample(prompt=prompt(tok, a, b), chosen=f"it is {a + b}", rejected=f"it is {a + b + 11}",
                        margin=1.0) for a, b in problems]


def arithmetic_points(tok, ids: bool = False) -> list[PointExample]:
    """4 prompts, each with a desirable and an undesirable completion (interleaved); `ids`: prompt ids p0..p3."""
    out = []
    for i, (a, b) in enumerate(PROBLEMS[:4]):
        prompt_id = f"p{i}" if ids else ""
        out.append(PointExample(prompt=prompt(tok, a, b), completion=f"it is {a + b}", score=1.0, label=True,
                                prompt_id=prompt_id))
        out.append(PointExample(prompt=prompt(tok, a, b), completion=f"it is {a + b + 11}", score=0.0,
                                label=False, prompt_id=prompt_id))
    return out


def _sums(s: int) -> list[str]:
    return [f"it is {s}", f"it is {s + 1}", f"it is {s + 10}", f"it is {s + 21}"]


GROUP_SCORES = [1.0, 0.6, 0.3, 0.0]


def arithmetic_groups(tok, completions: Callable[[int], list[str]] = _sums,
                      extra: Callable[[int, list[float]], dict] | None = None) -> list[GroupExample]:
    """4 prompts x 4 completions (from the sum) with distinct rewards, rotated by the group's index so that
    reward is not tied to position; `extra(g, rotated_scores)` adds fields to group g."""
    out = []
    for g, (a, b) in enumerate(PROBLEMS[:4]):
        texts = completions(a + b)
        scores = GROUP_SCORES[g:] + GROUP_SCORES[:g]
        out.append(GroupExample(prompt=prompt(tok, a, b), completions=texts[g:] + texts[:g], scores=scores,
                                **(extra(g, scores) if extra else {})))
    return out


def short_pairs(sampled: bool = False) -> list[PairExample]:
    """Three raw-text pairs with completions of different lengths (padding inside the batch); `sampled`: each
    carries a policy sample too."""
    rows = [("What is 12 + 34?", "it is 46", "it is 57 or so, maybe", "46"),
            ("What is 7 + 5? Answer briefly.", "12, since seven and five", "13", "it is 12 I think"),
            ("2 + 2 =", "4", "five", "four")]
    return [PairExample(prompt=p, chosen=c, rejected=r, margin=1.0, sampled=s if sampled else None)
            for p, c, r, s in rows]


# --- models -----------------------------------------------------------------------------------------------

def lora(path, r: int = 8, alpha: int = 16):
    """The tiny model with a fresh LoRA adapter (seeded: LoRA A init; LoRA B = 0, so policy == base)."""
    torch.manual_seed(0)
    return attach_adapter(load_policy(path), AdapterConfig(r=r, alpha=alpha))


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Move every trainable weight by random noise, so the policy differs from its reference."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def context(model, tok, examples: list, cfg, reference_model=None, moving=None) -> RoundContext:
    """A provider's round context on CPU over `examples`."""
    return RoundContext(model, tok, Instances(examples, tok, cfg.max_length), cfg, tok.pad_token_id, CPU,
                        reference_model, moving)


# --- plain references -------------------------------------------------------------------------------------

def encode_rows(tok, rows: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """One batch of (prompt, completion) rows, as the trainer encodes them."""
    return collate([encode(tok, p, c, False, MAX_LENGTH) for p, c in rows], tok.pad_token_id)


@torch.no_grad()
def plain_logp(model, batch, temperature: float = 1.0) -> torch.Tensor:
    """[N, L-1, V] float64 full-vocabulary log-softmax of a plain forward (position t predicts t+1)."""
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return torch.log_softmax(logits.double() / temperature, dim=-1)


def record_losses(monkeypatch) -> list[list[float]]:
    """Per optimize() call, the loss of each optimizer step (recorded around the trainer's `combined_loss`):
    append a fresh list before each call."""
    calls: list[list[float]] = []
    real = trainer.combined_loss

    def recording(terms, tensors):
        loss, metrics = real(terms, tensors)
        calls[-1].append(loss.item())
        return loss, metrics

    monkeypatch.setattr(trainer, "combined_loss", recording)
    return calls


def digit_prompts(path: Path, n: int) -> Path:
    """`n` prompts "What is i + 0?" with single-digit answers (i mod 3), as a prompt file at `path`: a random
    tiny model's samples are sometimes right, so verifier-judged pairs form."""
    import json

    path.write_text("".join(json.dumps({"prompt": f"What is {i} + 0?", "answer": str(i % 3)}) + "\n"
                            for i in range(n)))
    return path


def script_module(path: Path, name: str) -> Iterator[ModuleType]:
    """A script outside the package (a benchmark) imported as module `name`, for a module-scoped fixture to yield
    from; registered in sys.modules while in use, because dataclasses resolve their module by name."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(name, None)
