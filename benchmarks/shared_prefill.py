"""Benchmark: k samples per prompt from one shared prefill vs. the prompt repeated k times.

On the embedded model (SmolLM2-135M-Instruct) and the first GSM8K training questions, times
`alignpipe.synthesis.transformers_backend.generate` with `shared_prefill=True` and `False` at each k,
prints samples/s and the speedup, and checks that greedy decoding (temperature 0) gives identical tokens
on both paths. A script, not a test: it loads the real model and takes minutes on a few CPU cores.

    nice -n 5 .venv/bin/python benchmarks/shared_prefill.py [--ks 1 8 16] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import torch

from alignpipe.config import Gsm8kTask
from alignpipe.data.files import read_rows
from alignpipe.data.gsm8k import to_prompts
from alignpipe.models import load_policy, load_tokenizer, resolve_model_path
from alignpipe.records import Candidate
from alignpipe.synthesis.transformers_backend import generate, render_prompt

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


def timed(fn, *args, **kwargs) -> tuple[list[Candidate], float]:  # noqa: ANN001, ANN002, ANN003
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=GSM8K, help="GSM8K train.jsonl")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64, help="output rows per batch (prompts x k)")
    ap.add_argument("--temperature", type=float, default=1.0, help="of the timed sampling runs")
    ap.add_argument("--greedy-k", type=int, default=8, help="k of the greedy identity check (0: skip)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: on a few cores shared with other jobs, more threads spin-wait)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    path = resolve_model_path(None)
    model, tokenizer = load_policy(path), load_tokenizer(path)
    model.eval()
    prompts = to_prompts(read_rows(args.data), str(args.data), Gsm8kTask(path=str(args.data)).instruction)
    prompts = prompts[: args.prompts]
    lengths = [len(tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]) for p in prompts]
    print(f"CPU: {cpu_model()}; torch threads: {torch.get_num_threads()}; torch {torch.__version__}")
    print(f"model: {path.name}; {len(prompts)} GSM8K prompts, {min(lengths)}-{max(lengths)} tokens "
          f"(mean {sum(lengths) / len(lengths):.0f}); max_new_tokens {args.max_new_tokens}; "
          f"batch_size {args.batch_size} rows; sampling temperature {args.temperature:g}")
    common = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "seed": 0,
              "description": "benchmark"}
    generate(model, tokenizer, prompts[:2], 2, **common)  # warm-up: first-call allocations and kernel choice

    rows = []
    for k in args.ks:
        plain, t_plain = timed(generate, model, tokenizer, prompts, k, args.temperature, shared_prefill=False,
                               **common)
        shared, t_shared = timed(generate, model, tokenizer, prompts, k, args.temperature, shared_prefill=True,
                                 **common)
        same = [c.completion for c in plain] == [c.completion for c in shared]
        n = len(plain)
        rows.append((f"k={k}, T={args.temperature:g}", n, n / t_plain, n / t_shared, t_plain / t_shared, same))
    if args.greedy_k:
        k = args.greedy_k
        plain, t_plain = timed(generate, model, tokenizer, prompts, k, 0.0, shared_prefill=False, **common)
        shared, t_shared = timed(generate, model, tokenizer, prompts, k, 0.0, shared_prefill=True, **common)
        n = len(plain)
        same = [c.completion for c in plain] == [c.completion for c in shared]
        rows.append((f"k={k}, greedy", n, n / t_plain, n / t_shared, t_plain / t_shared, same))

    print(f"\n{'run':<16} {'samples':>7} {'repeated/s':>11} {'shared/s':>9} {'speedup':>8}  identical outputs")
    for name, n, plain_rate, shared_rate, speedup, same in rows:
        print(f"{name:<16} {n:>7} {plain_rate:>11.2f} {shared_rate:>9.2f} {speedup:>7.2f}x  {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
