"""Where the resident memory of a run goes (issue 11 item 3): one stage of a recipe in a fresh process, peak RSS
sampled every 10 ms, printed as JSON, under one of alignpipe's allocator policies (`alignpipe/allocator.py`,
--malloc fast|lean|default; the trainer trims the heap after every step unless `default`). E.g.

    python benchmarks/memory_probe.py generate --n 50 --new 256
    python benchmarks/memory_probe.py generate --n 50 --new 256 --malloc default   # glibc's own allocator
    python benchmarks/memory_probe.py train --n 16 [--no-checkpointing]

The stages use the embedded model on GSM8K prompts (../shared/data/gsm8k/train.jsonl): `generate` samples
greedily as the held-out evaluation does; `train` runs the quickstart's LoRA DPO + NLL on pairs of GSM8K's
worked solution against a truncated one.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRss:
    def __init__(self) -> None:
        self.peak, self._stop = rss_mb(), threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_mb())

    def reset(self) -> float:
        self.peak = rss_mb()
        return self.peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=["generate", "train"])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--no-checkpointing", action="store_true", help="train: gradient checkpointing off")
    parser.add_argument("--malloc", choices=["fast", "lean", "default"], default="fast",
                        help="alignpipe's allocator policy (ALIGNPIPE_MALLOC); default: glibc as it is")
    args = parser.parse_args()

    from alignpipe.allocator import configure_allocator
    from alignpipe.config import OptimizationConfig
    from alignpipe.data.files import read_rows
    from alignpipe.data.gsm8k import to_prompts
    from alignpipe.models import attach_adapter, load_policy, load_tokenizer, resolve_model_path
    from alignpipe.threads import configure_threads

    configure_threads()
    os.environ["ALIGNPIPE_MALLOC"] = args.malloc  # read by the trainer's trim after each step, too
    configure_allocator()
    meter = PeakRss()
    out: dict = {"stage": args.stage, "malloc": args.malloc,
                 "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
                 "rss_start_mb": rss_mb()}
    path = resolve_model_path(None, "merge")
    tokenizer = load_tokenizer(path)
    model = load_policy(path)
    out["rss_model_loaded_mb"] = meter.reset()
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
    prompts = to_prompts(read_rows(str(data))[: args.n], str(data), "")
    started = time.perf_counter()
    if args.stage == "generate":
        from alignpipe.synthesis.transformers_backend import generate

        generate(model, tokenizer, prompts, 1, 0.0, 1.0, args.new, args.batch, 0, {"source": "probe"}, "probe")
    else:
        from alignpipe.optimization.trainer import optimize
        from alignpipe.records import PairExample

        model = attach_adapter(model, OptimizationConfig.model_validate({"objectives": [{"name": "dpo"}]}).adapter)
        examples = [PairExample(prompt_id=p.id, prompt=tokenizer.apply_chat_template(
            [{"role": "user", "content": p.prompt}], tokenize=False, add_generation_prompt=True),
            chosen=p.meta["solution"], rejected=p.meta["solution"][: len(p.meta["solution"]) // 2], margin=1.0)
            for p in prompts]
        cfg = OptimizationConfig.model_validate({"objectives": [{"name": "dpo", "beta": 0.1}, {"name": "sft"}],
                                                 "batch_size": 8, "max_length": 384, "precision": "auto",
                                                 "gradient_checkpointing": "selective" if not args.no_checkpointing else False})
        out["train"] = optimize(model, tokenizer, examples, cfg)
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["stage_peak_rss_mb"] = round(meter.peak, 1)
    out["rss_end_mb"] = round(rss_mb(), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
