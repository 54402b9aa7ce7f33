"""Benchmark: DPO training speed and memory, alignpipe's trainer against TRL's DPOTrainer.

Same model (the embedded SmolLM2-135M-Instruct unless --model), same hh-rlhf pairs read with alignpipe's loader,
the same chat-templated prompt text and responses on both sides, same batches in the same order, batch size,
max length, precision (fp32), optimizer (torch AdamW, constant lr, clip 1.0), DPO sigmoid loss (beta 0.1), full
fine-tuning or LoRA (r 16, alpha 32, dropout 0, the same 7 projection modules), reference log-probs precomputed
before the first step in both, gradient checkpointing in both as each defaults (TRL recomputes whole layers;
alignpipe's `optimization.gradient_checkpointing: selective` keeps the MLP's gate/up projections under full
fine-tuning and the frozen base projections' outputs under LoRA; --no-gradient-checkpointing turns both off).

Truncation: TRL 1.16 only keeps the start of prompt + completion (`truncation_mode="keep_start"`), alignpipe keeps
the completion and cuts the prompt's start, so the two would train on different tokens for an over-long pair. The
benchmark therefore uses the first pairs of the file whose rows fit in max_length as they are: neither side
truncates, and the worker checks that TRL's tokenized rows equal alignpipe's token for token.

Figures: tokens/s = the non-padding tokens of chosen + rejected rows (prompt included in each, as both compute it)
of the measured steps, over the time from the end of optimizer step `warmup` to the end of step warmup + steps
(a global optimizer step hook: the same boundaries in both frameworks, each step including its collation, forward,
backward, clipping and update). Peak RSS: ru_maxrss of the worker process; `before-train` is its value at the first
forward with gradients (model load + reference precompute). `user_s`, `system_s`, `minor_faults`: the worker's user
and system CPU time and minor page faults over the measured steps (getrusage). Each run is its own process, which
applies alignpipe's allocator policy (`ALIGNPIPE_MALLOC`) before importing torch for alignpipe and leaves glibc's
and torch's defaults for TRL; per configuration the runs alternate alignpipe / TRL, `--repeats` times.

    nice -n 5 .venv/bin/python benchmarks/dpo.py --lengths 256 512 --modes full lora --steps 10 --repeats 2 \
        --out bench-results/dpo.json
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FRAMEWORKS = ("alignpipe", "trl")


@dataclass
class BenchPair:
    """One pair as both frameworks get it: the chat-templated prompt (generation prompt included) and the raw
    responses; each side appends EOS to a response."""

    prompt: str
    chosen: str
    rejected: str


@dataclass
class RunSpec:
    """What one worker process runs. `pairs` in file order; `batches` the pair indices of each step, in order."""

    framework: str
    model: str
    mode: str  # full | lora
    max_length: int
    batch_size: int
    warmup: int
    steps: int
    pairs: list[BenchPair]
    batches: list[list[int]]
    learning_rate: float = 5e-6
    beta: float = 0.1
    seed: int = 0
    threads: int = 0  # 0: torch's default
    gradient_checkpointing: bool = True  # both frameworks' default (alignpipe's optimization.gradient_checkpointing)


# ---------------------------------------------------------------- data, shared by both sides


def pair_rows(tokenizer: Any, pair: BenchPair, max_length: int) -> list[list[int]]:
    """The chosen and rejected token rows (prompt + response + EOS) as alignpipe's trainer builds them."""
    from alignpipe.optimization.batching import encode

    return [encode(tokenizer, pair.prompt, response, False, max_length)[0] for response in (pair.chosen, pair.rejected)]


def pair_tokens(tokenizer: Any, pair: BenchPair, max_length: int) -> int:
    """Non-padding tokens of a pair: both rows, the prompt counted in each."""
    return sum(len(row) for row in pair_rows(tokenizer, pair, max_length))


def fitting_pairs(path: Path, tokenizer: Any, max_length: int, n: int) -> tuple[list[BenchPair], int]:
    """The first `n` pairs of `path` whose two rows fit in `max_length` untruncated, and how many were passed over."""
    from alignpipe.data.pairs import load_pairs
    from alignpipe.synthesis.transformers_backend import render_prompt

    out, skipped = [], 0
    for labelled in load_pairs(path):
        pair = BenchPair(render_prompt(tokenizer, labelled.prompt), labelled.chosen.completion,
                         labelled.rejected.completion)
        if max(len(row) for row in pair_rows(tokenizer, pair, 10**9)) <= max_length:
            out.append(pair)
            if len(out) == n:
                return out, skipped
        else:
            skipped += 1
    raise SystemExit(f"{path}: only {len(out)} pairs fit in max_length {max_length}, {n} needed")


def plan_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """The batches alignpipe's trainer draws for pairs of these token counts (its own shuffle and length
    bucketing, same seed); TRL is given the pairs in this order with a sequential sampler, so that step k of both
    trains on the same pairs."""
    from alignpipe.optimization.trainer import _batches

    return list(_batches(len(lengths), batch_size, random.Random(seed), lengths))


# ---------------------------------------------------------------- measuring inside a worker


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Meter:
    """Step boundaries and memory of one run. The end of every optimizer step comes from torch's global step hook,
    which fires for alignpipe's AdamW and for the one TRL's Trainer builds alike; the first forward with gradients
    enabled marks the end of the set-up (model load, reference precompute). `tokens_seen`: attention-mask sums of
    the training forwards (the TRL side's own count of its inputs)."""

    def __init__(self, decoder: Any) -> None:
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.step_ends: list[float] = []
        self.step_usage: list[tuple[float, float, int]] = []  # (user s, system s, minor page faults) at each end
        self.tokens_seen: list[int] = []
        self.rss_before_train_mb: float | None = None
        self._torch = torch
        self._hooks = [register_optimizer_step_post_hook(self._on_step),
                       decoder.register_forward_pre_hook(self._on_forward, with_kwargs=True)]

    def _on_step(self, *_: Any) -> None:
        self.step_ends.append(time.perf_counter())
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.step_usage.append((usage.ru_utime, usage.ru_stime, usage.ru_minflt))

    def _on_forward(self, _module: Any, args: tuple, kwargs: dict) -> None:
        if not self._torch.is_grad_enabled():
            return
        if self.rss_before_train_mb is None:
            self.rss_before_train_mb = peak_rss_mb()
        mask = kwargs.get("attention_mask")
        if isinstance(mask, self._torch.Tensor) and mask.dim() == 2:
            self.tokens_seen.append(int(mask.sum()))

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def summarise(spec: RunSpec, meter: Meter, tokens_per_step: list[int]) -> dict[str, Any]:
    """Tokens/s over the measured steps, from the step boundaries and the per-step token counts."""
    if len(meter.step_ends) != spec.warmup + spec.steps:
        raise RuntimeError(f"{spec.framework}: {len(meter.step_ends)} optimizer steps, expected "
                           f"{spec.warmup + spec.steps}")
    if spec.warmup < 1 or len(tokens_per_step) != len(meter.step_ends):
        raise RuntimeError(f"{spec.framework}: {len(tokens_per_step)} token counts for {len(meter.step_ends)} steps "
                           f"(warmup {spec.warmup}: at least 1, the window starts at the end of a step)")
    start = meter.step_ends[spec.warmup - 1]
    measured = tokens_per_step[spec.warmup:]
    seconds = meter.step_ends[-1] - start
    (user0, sys0, faults0), (user1, sys1, faults1) = meter.step_usage[spec.warmup - 1], meter.step_usage[-1]
    return {"framework": spec.framework, "mode": spec.mode, "max_length": spec.max_length,
            "batch_size": spec.batch_size, "warmup": spec.warmup, "steps": spec.steps,
            "measured_steps": len(measured), "tokens": sum(measured), "tokens_all_steps": sum(tokens_per_step),
            "tokens_per_step": tokens_per_step, "seconds": seconds, "tokens_per_s": sum(measured) / seconds,
            "step_time_s": seconds / len(measured), "peak_rss_mb": peak_rss_mb(),
            # CPU time of the same window: user time moves less than wall time when the machine is shared
            "user_s": user1 - user0, "system_s": sys1 - sys0, "minor_faults": faults1 - faults0,
            "rss_before_train_mb": meter.rss_before_train_mb}


def _threads(spec: RunSpec) -> None:
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)


def _load(spec: RunSpec) -> tuple[Any, Any, float, Meter]:
    """What both sides start from: threads, seed, tokenizer, model, the RSS after loading, a step meter."""
    import torch

    from alignpipe.models import load_policy, load_tokenizer

    _threads(spec)
    torch.manual_seed(spec.seed)
    tokenizer = load_tokenizer(spec.model)
    model = load_policy(spec.model)
    return tokenizer, model, peak_rss_mb(), Meter(model.model)


def run_alignpipe(spec: RunSpec) -> dict[str, Any]:
    """alignpipe's `optimize()` on the spec's pairs (one epoch = warmup + steps batches)."""

    from alignpipe.config import AdapterConfig, ObjectiveTerm, OptimizationConfig
    from alignpipe.models import attach_adapter
    from alignpipe.optimization import trainer
    from alignpipe.records import PairExample

    tokenizer, model, rss_load, meter = _load(spec)
    adapter = AdapterConfig(r=16, alpha=32, dropout=0.0, target_modules=LORA_TARGETS) if spec.mode == "lora" else None
    model = attach_adapter(model, adapter)
    cfg = OptimizationConfig(objectives=[ObjectiveTerm(name="dpo", beta=spec.beta)], adapter=adapter,
                             reference="base", learning_rate=spec.learning_rate, weight_decay=0.0, epochs=1,
                             batch_size=spec.batch_size, max_grad_norm=1.0, max_length=spec.max_length,
                             precision="fp32", measure_signal=False,
                             # on: alignpipe's default kind ("selective"); TRL's side recomputes whole layers
                             gradient_checkpointing=OptimizationConfig().gradient_checkpointing
                             if spec.gradient_checkpointing else False)
    examples = [PairExample(prompt=p.prompt, chosen=p.chosen, rejected=p.rejected, margin=1.0) for p in spec.pairs]
    drawn: list[list[int]] = []
    original = trainer._batches

    def recording(n: int, batch_size: int, rng: random.Random, lengths=None):  # noqa: ANN001, ANN202 - a generator
        for batch in original(n, batch_size, rng, lengths):
            drawn.append(list(batch))
            yield batch

    trainer._batches = recording  # records which pairs each step trained on; changes nothing else
    try:
        # no frozen copy under full fine-tuning: the policy before its first step is the base, as in TRL's
        # precompute (the loop keeps a copy only for later rounds)
        metrics = trainer.optimize(model, tokenizer, examples, cfg, seed=spec.seed)
    finally:
        trainer._batches = original
        meter.close()
    tokens = [sum(pair_tokens(tokenizer, spec.pairs[i], spec.max_length) for i in batch) for batch in drawn]
    out = summarise(spec, meter, tokens)
    out |= {"rss_load_mb": rss_load, "same_batches_as_plan": drawn == spec.batches,
            "trainer_tokens_per_s": metrics.get("tokens_per_s"), "loss": metrics.get("loss"),
            "prefix_sharing": getattr(cfg, "prefix_sharing", None)}
    return out


def run_trl(spec: RunSpec) -> dict[str, Any]:
    """TRL's DPOTrainer on the same pairs, in the plan's batch order."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer


    tokenizer, model, rss_load, meter = _load(spec)
    order = [i for batch in spec.batches for i in batch]
    data = Dataset.from_list([asdict(spec.pairs[i]) for i in order])  # plain text: the same templated prompt
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                             task_type="CAUSAL_LM") if spec.mode == "lora" else None
    with tempfile.TemporaryDirectory() as out_dir:
        args = DPOConfig(
            output_dir=out_dir, per_device_train_batch_size=spec.batch_size, gradient_accumulation_steps=1,
            max_steps=spec.warmup + spec.steps, learning_rate=spec.learning_rate, lr_scheduler_type="constant",
            warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", beta=spec.beta,
            loss_type=["sigmoid"], max_length=spec.max_length, precompute_ref_log_probs=True,
            precompute_ref_batch_size=2 * spec.batch_size,  # pairs; alignpipe's precompute: 4 x batch_size rows
            gradient_checkpointing=spec.gradient_checkpointing, bf16=False, fp16=False,
            use_cpu=not torch.cuda.is_available(), train_sampling_strategy="sequential", seed=spec.seed,
            report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
            dataloader_num_workers=0)
        trl_trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                 peft_config=peft_config)
        mismatches = sum(
            [row["prompt_ids"] + row["chosen_ids"], row["prompt_ids"] + row["rejected_ids"]]
            != pair_rows(tokenizer, spec.pairs[i], spec.max_length)
            for i, row in zip(order, trl_trainer.train_dataset, strict=True))
        try:
            trl_trainer.train()
        finally:
            meter.close()
    out = summarise(spec, meter, meter.tokens_seen)
    expected = [sum(pair_tokens(tokenizer, spec.pairs[i], spec.max_length) for i in b) for b in spec.batches]
    out |= {"rss_load_mb": rss_load, "token_mismatches": mismatches, "tokens_as_alignpipe_counts": expected,
            "gradient_checkpointing": bool(args.gradient_checkpointing), "loss": trl_trainer.state.log_history[-1]
            .get("train_loss") if trl_trainer.state.log_history else None}
    return out


def worker(spec_path: Path, result_path: Path) -> None:
    raw = json.loads(spec_path.read_text())
    spec = RunSpec(**{**raw, "pairs": [BenchPair(**p) for p in raw["pairs"]]})
    if spec.framework == "alignpipe":  # as `alignpipe run` does, before torch's first allocation (allocator.py)
        from alignpipe.allocator import configure_allocator

        configure_allocator()
    result = (run_alignpipe if spec.framework == "alignpipe" else run_trl)(spec)
    result_path.write_text(json.dumps(result))


# ---------------------------------------------------------------- the driver


def run_in_subprocess(spec: RunSpec, work: Path) -> dict[str, Any]:
    """One run in a fresh interpreter (not a fork), so that its ru_maxrss is its own."""
    spec_path, result_path = work / "spec.json", work / "result.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    result_path.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path), "--result", str(result_path)],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not result_path.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"{spec.framework} {spec.mode} L={spec.max_length} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(result_path.read_text())


def table(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Per configuration and framework: median tokens/s, max peak RSS; alignpipe's ratios to TRL."""
    rows: list[dict[str, Any]] = []
    keys = sorted({(r["max_length"], r["mode"]) for r in results})
    for length, mode in keys:
        by_fw = {}
        for fw in FRAMEWORKS:
            runs = [r for r in results if (r["max_length"], r["mode"], r["framework"]) == (length, mode, fw)]
            if runs:
                by_fw[fw] = {"config": f"{mode} L={length}", "framework": fw, "runs": len(runs),
                             "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                             "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                             "rss_before_train_mb": max(r["rss_before_train_mb"] or 0 for r in runs)}
        if "alignpipe" in by_fw and "trl" in by_fw:
            ours, theirs = by_fw["alignpipe"], by_fw["trl"]
            ours["speed_ratio"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
            ours["rss_ratio"] = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
        rows.extend(by_fw.values())
    lines = [f"{'config':<12} {'framework':<10} {'tokens/s':>9} {'peak RSS MB':>12} {'before-train MB':>16} "
             f"{'ratio (speed, RSS)':>19}"]
    for r in rows:
        ratio = f"{r['speed_ratio']:.2f}x, {r['rss_ratio']:.2f}" if "speed_ratio" in r else ""
        lines.append(f"{r['config']:<12} {r['framework']:<10} {r['tokens_per_s']:>9.1f} {r['peak_rss_mb']:>12.0f} "
                     f"{r['rss_before_train_mb']:>16.0f} {ratio:>19}")
    return rows, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="hh-rlhf (or TRL preference) jsonl")
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2-135M)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--modes", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    ap.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    ap.add_argument("--steps", type=int, default=10, help="measured steps, after --warmup steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads in each worker (0: default)")
    ap.add_argument("--no-gradient-checkpointing", action="store_true",
                    help="both frameworks keep every activation (the default recomputes them, as both do by default)")
    ap.add_argument("--out", type=Path, default=Path("bench-results/dpo.json"))
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.result)
        return
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be at least 1 (the window starts at the end of a step)")
    require_trl(args.frameworks)

    from alignpipe.models import load_tokenizer, resolve_model_path

    model = str(resolve_model_path(args.model))
    tokenizer = load_tokenizer(model)
    n = (args.warmup + args.steps) * args.batch_size
    results, data_notes = [], {}
    with tempfile.TemporaryDirectory() as work:
        for length in args.lengths:
            pairs, skipped = fitting_pairs(args.data, tokenizer, length, n)
            counts = [pair_tokens(tokenizer, p, length) for p in pairs]
            batches = plan_batches(counts, args.batch_size, seed=0)
            mean = sum(counts) / len(pairs)
            data_notes[length] = {"pairs": n, "passed_over_too_long": skipped, "mean_tokens_per_pair": mean}
            print(f"L={length}: first {n} pairs that fit ({skipped} longer ones passed over), "
                  f"{mean:.0f} tokens per pair (chosen + rejected)", flush=True)
            for mode in args.modes:
                for repeat in range(args.repeats):
                    for fw in args.frameworks:
                        spec = RunSpec(fw, model, mode, length, args.batch_size, args.warmup, args.steps, pairs,
                                       batches, threads=args.threads,
                                       gradient_checkpointing=not args.no_gradient_checkpointing)
                        result = run_in_subprocess(spec, Path(work)) | {"repeat": repeat}
                        results.append(result)
                        print(f"  {mode:<4} {fw:<9} #{repeat + 1}: {result['tokens_per_s']:.1f} tokens/s, "
                              f"peak RSS {result['peak_rss_mb']:.0f} MB, measured steps: "
                              f"{result['tokens'] / result['user_s']:.1f} tokens per user-CPU-s, "
                              f"{result['system_s']:.1f} s system, {result['minor_faults']} page faults", flush=True)
    rows, text = table(results)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(sys.argv), "data": str(args.data), "model": model, "uptime": _uptime(),
            "git": _git_state(),
            "warmup": args.warmup, "steps": args.steps, "batch_size": args.batch_size, "data_per_length": data_notes}
    args.out.write_text(json.dumps({"meta": meta, "table": rows, "runs": results}, indent=1))
    print(f"\nwrote {args.out}")


def require_trl(frameworks: list[str]) -> None:
    """Stop with the install command when TRL is asked for and not installed (it is the `bench` extra)."""
    import importlib.util

    if "trl" in frameworks and importlib.util.find_spec("trl") is None:
        raise SystemExit("trl is not installed: pip install -e '.[bench]' (or --frameworks alignpipe)")


def _git_state() -> dict[str, Any]:
    """The revision measured, and whether the trainer's files differed from it (figures from an uncommitted
    trainer are not the revision's)."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).resolve().parent).stdout.rstrip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {"revision": git("rev-parse", "HEAD"),
            "uncommitted_optimization_files": git("status", "--porcelain", "--", "../src/alignpipe/optimization")}


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


if __name__ == "__main__":
    main()
