"""Benchmark: the GRPO recipe (grpo-arithmetic) against TRL's GRPOTrainer, held-out accuracy over wall time.

Same model (the embedded SmolLM2-135M-Instruct unless --model), task, reward and held-out set. alignpipe runs the
recipe (`python -m alignpipe run RECIPE --set ...`) in its own process; TRL's GRPOTrainer runs in another, set
from the same recipe after the same overrides: the alignpipe run's round-NN/prompts.parquet in order
(`shuffle_dataset=False`; without an alignpipe run, the prompts the loop draws), rendered by alignpipe's
`render_prompt`; alignpipe's math_verifier as the reward (1.0 correct, else 0.0; gold answer in a column);
num_generations = samples_per_prompt, max_completion_length = max_new_tokens, the recipe's temperature (also the
log-prob temperature on both sides) and top_p, no top-k, no vLLM; grpo's beta, epsilon, k3 KL to the
LoRA-disabled base, advantages (r - mean) / (std + 1e-4) per group, per-sequence token means (TRL loss_type
"grpo"); LoRA with the recipe's r / alpha / dropout / targets ("all-linear"); torch AdamW, the recipe's lr
(constant), weight decay and clip norm; fp32 on both (precision=fp32, bf16=False); gradient checkpointing on in
both (both defaults; --no-gradient-checkpointing: off in both).

Steps per round. alignpipe samples P prompts x K once per round, then makes `epochs` passes over the round's G
groups, `batch_size` groups a step: epochs * ceil(G / batch_size) steps, G <= P since groups whose rewards all tie
are dropped (drop_uniform_groups). TRL: generation_batch_size P * K, per_device_train_batch_size batch_size * K
completions, steps_per_generation P / batch_size, num_iterations epochs: one generation of the same P prompts and
epochs * P / batch_size steps a round (the recipe's 24 x 6, batch 4, 2 epochs: 12 steps; alignpipe 12 or fewer).
What TRL cannot mirror: it keeps tied groups (advantage 0: only the KL term, and a smaller mean step), its steps
hold shuffled completions rather than whole groups, its AdamW state lives across rounds (alignpipe starts a fresh
one each round). Each point records its round's steps.

Held-out accuracy: alignpipe's `heldout_accuracy` (greedy, its verifier) on the loop's held-out problems after each
round: TRL's policy from a TrainerCallback at each round's last step, alignpipe's from each round's checkpoint after
the run. Wall time leaves every evaluation out: TRL's from `on_train_begin` minus the callbacks' evaluations;
alignpipe's from the write of round 0's prompts.parquet to each round's metrics.json (the loop evaluates only
before round 0 and after the last), so its checkpoints and diagnostics count too; the loop's own stage seconds
(sampling, judging, instantiation, training) are kept beside it as `stage_seconds`.

    nice -n 5 .venv/bin/python benchmarks/grpo.py --out bench-results/grpo.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FRAMEWORKS = ("alignpipe", "trl")
HERE = Path(__file__).resolve().parent


@dataclass
class RunSpec:
    """What one worker process runs. `overrides`: KEY=VALUE recipe overrides, the same on both sides."""

    framework: str
    recipe: str
    overrides: list[str]
    work_dir: str  # alignpipe: its --output-dir; TRL: the held-out answers' cache
    prompts_from: str | None = None  # TRL: the alignpipe run directory whose round prompts it trains on
    threads: int = 0  # 0: alignpipe's own choice (threads.py), on both sides


# ---------------------------------------------------------------- what both sides share


def bench_recipe(spec: RunSpec) -> Any:
    from alignpipe.cli import _overrides
    from alignpipe.config import load_recipe

    return load_recipe(spec.recipe, _overrides(spec.overrides))


def trl_settings(recipe: Any) -> dict[str, Any]:
    """GRPOConfig arguments that match the recipe (see the module docstring); SystemExit for a recipe TRL's
    GRPOTrainer cannot mirror."""
    from alignpipe.optimization.objectives import OBJECTIVES

    syn, opt, adapter = recipe.synthesis, recipe.optimization, recipe.optimization.adapter
    terms = opt.objectives
    problems = [
        (len(terms) != 1 or terms[0].name != "grpo", "one objective, grpo"),
        (adapter is None or adapter.method != "lora", "a LoRA adapter"),
        (recipe.instantiation.kind != "group", "instantiation.kind group"),
        (recipe.evaluation.judge != "math_verifier", "evaluation.judge math_verifier"),
        (syn.source != "policy" or syn.backend != "transformers" or syn.dynamic_sampling or syn.verbalized
         or syn.temperature_schedule, "plain policy sampling with transformers"),
        (opt.temperature != syn.temperature, "optimization.temperature == synthesis.temperature"),
        (opt.grad_accum != 1 or opt.reference != "base", "grad_accum 1, reference base"),
        (syn.prompts_per_round % opt.batch_size, "prompts_per_round a multiple of batch_size"),
    ]
    params = {**OBJECTIVES["grpo"].defaults, **terms[0].params} if terms[0].name == "grpo" else {}
    problems.append((params.get("kl_estimator", "k3") != "k3", "kl_estimator k3"))
    unmet = [need for bad, need in problems if bad]
    if unmet:
        raise SystemExit(f"TRL's GRPOTrainer cannot mirror this recipe: needs {', '.join(unmet)}")
    steps_per_generation = syn.prompts_per_round // opt.batch_size
    return dict(
        num_generations=syn.samples_per_prompt, max_completion_length=syn.max_new_tokens,
        temperature=syn.temperature, top_p=syn.top_p, top_k=0,
        per_device_train_batch_size=opt.batch_size * syn.samples_per_prompt, gradient_accumulation_steps=1,
        steps_per_generation=steps_per_generation, num_iterations=opt.epochs,
        max_steps=recipe.rounds * opt.epochs * steps_per_generation,
        beta=params["beta"], epsilon=params["epsilon"], scale_rewards="group",
        loss_type={"sequence": "grpo", "token": "bnpo"}[params.get("aggregation", "sequence")],
        learning_rate=opt.learning_rate, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        weight_decay=opt.weight_decay, max_grad_norm=opt.max_grad_norm, gradient_checkpointing=bool(opt.gradient_checkpointing),
        bf16=False, fp16=False, seed=recipe.seed, shuffle_dataset=False)


def loop_prompts(recipe: Any) -> list[list[Any]]:
    """Each round's training prompts as the loop draws them (loop.run: the seeded pool, consecutive slices)."""
    from alignpipe.data import load_task

    pool = list(load_task(recipe.task, recipe.heldout.n).train)
    random.Random(recipe.seed).shuffle(pool)
    per = recipe.synthesis.prompts_per_round
    return [[pool[(r * per + i) % len(pool)] for i in range(per)] for r in range(recipe.rounds)]


def run_prompts(run_dir: Path, rounds: int) -> list[list[Any]]:
    from alignpipe.records import Prompt, read_records

    return [read_records(run_dir / f"round-{r:02d}" / "prompts.parquet", Prompt) for r in range(rounds)]


def arithmetic_reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """alignpipe's verifier as a TRL reward function: 1.0 when the completion's answer is the gold one, else 0.0."""
    from alignpipe.evaluation.math_verifier import math_verifier
    from alignpipe.instantiation import score_of
    from alignpipe.records import Candidate, Prompt

    return [score_of(math_verifier(Prompt(id=str(i), prompt="", task="math", reference=gold),
                                   Candidate(prompt_id=str(i), id=str(i), completion=text)))
            for i, (text, gold) in enumerate(zip(completions, answer, strict=True))]


class Heldout:
    """alignpipe's held-out greedy accuracy of a policy, on the loop's held-out problems."""

    def __init__(self, recipe: Any, cache: Path) -> None:
        from alignpipe.data import load_task
        from alignpipe.evaluation.verifiers import verifier

        cache.mkdir(parents=True, exist_ok=True)  # a fresh folder: cached answers are never read back
        self.recipe, self.cache, self.seconds = recipe, Path(tempfile.mkdtemp(dir=cache)), 0.0
        self.prompts = load_task(recipe.task, recipe.heldout.n).heldout
        self.judge = verifier("math_verifier")

    def __call__(self, model: Any, tokenizer: Any, label: str) -> float:
        import torch

        from alignpipe.loop import heldout_accuracy

        started, training = time.perf_counter(), model.training
        with torch.random.fork_rng(devices=[]):  # the evaluation leaves the training's random streams alone
            out = heldout_accuracy(model.eval(), tokenizer, self.prompts, self.recipe, self.cache, label, label,
                                   self.judge)
        model.train(training)
        self.seconds += time.perf_counter() - started
        return out["accuracy"]


def _threads(spec: RunSpec) -> int:
    import torch

    from alignpipe.threads import configure_threads

    if spec.threads:
        torch.set_num_threads(spec.threads)
        return spec.threads
    return configure_threads()


# ---------------------------------------------------------------- the two sides


def run_alignpipe(spec: RunSpec) -> dict[str, Any]:
    """`alignpipe run` in its own process; then its rounds' checkpoints through the held-out evaluation."""
    import torch

    from alignpipe.models import attach_adapter, load_checkpoint, load_policy, load_tokenizer

    recipe = bench_recipe(spec)
    env = os.environ | ({"ALIGNPIPE_THREADS": str(spec.threads)} if spec.threads else {})
    cmd = [sys.executable, "-m", "alignpipe", "run", spec.recipe, "--output-dir", spec.work_dir,
           *[a for kv in spec.overrides for a in ("--set", kv)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"alignpipe run failed (exit {proc.returncode}):\n{tail}")
    run_dir = Path(spec.work_dir) / recipe.name
    summary = json.loads((run_dir / "summary.json").read_text())
    start = (run_dir / "round-00" / "prompts.parquet").stat().st_mtime
    _threads(spec)
    tokenizer, model = load_tokenizer(recipe.model), load_policy(recipe.model)
    torch.manual_seed(recipe.seed)
    model = attach_adapter(model, recipe.optimization.adapter)
    heldout, points, stage = Heldout(recipe, Path(spec.work_dir) / "bench-eval"), [], 0.0
    points.append({"round": 0, "seconds": 0.0, "stage_seconds": 0.0, "accuracy": summary["before"]["accuracy"]})
    for r, metrics in enumerate(summary["rounds"]):
        rd = run_dir / f"round-{r:02d}"
        load_checkpoint(model, rd / "checkpoint")
        stage += sum(metrics["stage_seconds"].values())
        points.append({"round": r + 1, "seconds": (rd / "metrics.json").stat().st_mtime - start,
                       "stage_seconds": stage, "accuracy": heldout(model, tokenizer, f"round-{r:02d}"),
                       "steps": metrics["train"].get("steps", 0), "groups": metrics["examples"]})
    threads = re.search(r"(\d+)\s+torch\s+threads", proc.stdout)
    return {"framework": "alignpipe", "points": points, "run_dir": str(run_dir),
            "torch_threads": int(threads.group(1)) if threads else None,
            "last_round_matches_summary": points[-1]["accuracy"] == summary["after"]["accuracy"]}


def run_trl(spec: RunSpec) -> dict[str, Any]:
    """TRL's GRPOTrainer on the same rounds' prompts; held-out accuracy at the end of each round's steps."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from alignpipe.models import load_policy, load_tokenizer
    from alignpipe.synthesis.transformers_backend import render_prompt

    recipe = bench_recipe(spec)
    settings = trl_settings(recipe)
    threads = _threads(spec)
    rounds = run_prompts(Path(spec.prompts_from), recipe.rounds) if spec.prompts_from else loop_prompts(recipe)
    tokenizer, model = load_tokenizer(recipe.model), load_policy(recipe.model)
    rows = [{"prompt": render_prompt(tokenizer, p), "answer": p.reference} for prompts in rounds for p in prompts]
    added_tokens = sum(tokenizer(r["prompt"])["input_ids"] != tokenizer(r["prompt"], add_special_tokens=False)
                       ["input_ids"] for r in rows)  # TRL tokenizes a text prompt with special tokens, alignpipe not
    heldout = Heldout(recipe, Path(spec.work_dir) / "bench-eval")
    points = [{"round": 0, "seconds": 0.0, "accuracy": heldout(model, tokenizer, "before")}]
    per_round, adapter, seen = settings["max_steps"] // recipe.rounds, recipe.optimization.adapter, []

    def arithmetic(prompts: list[str], **kwargs: Any) -> list[float]:  # records which prompts TRL sampled
        seen.extend(prompts[:: settings["num_generations"]])
        return arithmetic_reward(**kwargs)

    class RoundEval(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            self.start = time.perf_counter() - heldout.seconds  # minus the evaluation before training

        def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
            if state.global_step % per_round == 0:
                seconds = time.perf_counter() - self.start - heldout.seconds
                points.append({"round": state.global_step // per_round, "seconds": seconds, "steps": per_round,
                               "accuracy": heldout(model, tokenizer, f"round-{len(points) - 1:02d}")})

    with tempfile.TemporaryDirectory() as out_dir:
        args = GRPOConfig(output_dir=out_dir, use_cpu=not torch.cuda.is_available(), use_vllm=False,
                          report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
                          dataloader_num_workers=0, **settings)
        torch.manual_seed(recipe.seed)  # the LoRA initialisation, as alignpipe's attach_adapter draws it
        trainer = GRPOTrainer(
            model=model, reward_funcs=arithmetic, args=args, train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer, callbacks=[RoundEval()],
            peft_config=LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                                   target_modules=adapter.target_modules, task_type="CAUSAL_LM"))
        trainer.train()
    return {"framework": "trl", "points": points, "torch_threads": threads, "settings": settings,
            "prompts_with_added_tokens": added_tokens, "prompts_as_planned": seen == [r["prompt"] for r in rows],
            "gradient_checkpointing": bool(args.gradient_checkpointing), "prompts_from": spec.prompts_from}


def worker(spec_path: Path, result_path: Path) -> None:
    spec = RunSpec(**json.loads(spec_path.read_text()))
    result_path.write_text(json.dumps((run_alignpipe if spec.framework == "alignpipe" else run_trl)(spec)))


# ---------------------------------------------------------------- figures


def time_to_reach(points: list[dict[str, Any]], target: float) -> float | None:
    """Training seconds at the first point whose held-out accuracy is at least `target`; None: never."""
    return next((p["seconds"] for p in points if p["accuracy"] >= target), None)


def accuracy_at(points: list[dict[str, Any]], seconds: float) -> float:
    """Accuracy of the last point at or before `seconds` (the untrained policy's at 0)."""
    return [p for p in points if p["seconds"] <= seconds][-1]["accuracy"]


def derived(results: dict[str, dict[str, Any]], target: float) -> dict[str, Any]:
    out: dict[str, Any] = {"target": target, "seconds_to_target": {fw: time_to_reach(r["points"], target)
                                                                   for fw, r in results.items()}}
    if set(results) == set(FRAMEWORKS):
        ours, trl = results["alignpipe"]["points"], results["trl"]["points"]
        final = trl[-1]["accuracy"]
        equal = min(ours[-1]["seconds"], trl[-1]["seconds"])
        mine = time_to_reach(ours, final)
        out |= {"trl_final_accuracy": final, "trl_seconds_total": trl[-1]["seconds"],
                "trl_seconds_to_its_final": time_to_reach(trl, final), "alignpipe_seconds_to_trl_final": mine,
                "alignpipe_time_share_of_trl": None if mine is None else mine / trl[-1]["seconds"],
                "equal_wall_seconds": equal, "accuracy_at_equal_wall": {
                    fw: accuracy_at(r["points"], equal) for fw, r in results.items()}}
    return out


def table(results: dict[str, dict[str, Any]], figures: dict[str, Any]) -> str:
    lines = [f"{'framework':<10} {'round':>5} {'steps':>5} {'train s':>9} {'held-out acc':>13}"]
    for fw, r in results.items():
        lines += [f"{fw:<10} {p['round']:>5} {p.get('steps', ''):>5} {p['seconds']:>9.1f} {p['accuracy']:>13.1%}"
                  for p in r["points"]]

    def s(v: float | None) -> str:
        return "not reached" if v is None else f"{v:.1f} s"

    lines.append("")
    lines += [f"time to {figures['target']:.0%}: {fw} {s(v)}" for fw, v in figures["seconds_to_target"].items()]
    if "trl_final_accuracy" in figures:
        share = figures["alignpipe_time_share_of_trl"]
        lines += [f"TRL final {figures['trl_final_accuracy']:.1%} after {s(figures['trl_seconds_total'])} "
                  f"(first at {s(figures['trl_seconds_to_its_final'])}); alignpipe reaches it at "
                  f"{s(figures['alignpipe_seconds_to_trl_final'])}"
                  + ("" if share is None else f" ({share:.2f} of TRL's time)"),
                  f"at equal wall time {figures['equal_wall_seconds']:.1f} s: " + ", ".join(
                      f"{fw} {a:.1%}" for fw, a in figures["accuracy_at_equal_wall"].items())]
    return "\n".join(lines)


# ---------------------------------------------------------------- the driver


def run_in_subprocess(spec: RunSpec, work: Path) -> dict[str, Any]:
    spec_path, result_path = work / f"{spec.framework}-spec.json", work / f"{spec.framework}-result.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path), "--result", str(result_path)],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not result_path.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"{spec.framework} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(result_path.read_text())


def cpu_info() -> dict[str, Any]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {"model_name": fields.get("Model name", "").strip(), "avx512_bf16": "avx512_bf16" in flags,
            "amx": any(f.startswith("amx") for f in flags)}


def _dpo() -> Any:
    """benchmarks/dpo.py, for its `_git_state` and `_uptime`."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import dpo

    return dpo


def git_state() -> dict[str, Any]:
    """dpo.py's (revision, uncommitted trainer files) and every uncommitted file of the package."""
    status = subprocess.run(["git", "status", "--porcelain", "--", "src/alignpipe"], capture_output=True,
                            text=True, cwd=HERE.parent).stdout.rstrip()
    return _dpo()._git_state() | {"uncommitted_alignpipe_files": status}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2-135M)")
    ap.add_argument("--recipe", default="grpo-arithmetic")
    ap.add_argument("--rounds", type=int, default=None, help="override the recipe's rounds")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for both sides (as `alignpipe run --set`)")
    ap.add_argument("--target", type=float, default=0.4, help="held-out accuracy to time")
    ap.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    ap.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0: alignpipe's choice)")
    ap.add_argument("--no-gradient-checkpointing", action="store_true", help="off in both (default: on in both)")
    ap.add_argument("--work-dir", type=Path, default=None, help="keep the runs here (default: a temporary dir)")
    ap.add_argument("--out", type=Path, default=Path("bench-results/grpo.json"))
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.result)
        return
    _dpo().require_trl(args.frameworks)

    from alignpipe.models import resolve_model_path

    model = str(resolve_model_path(args.model))
    overrides = [*args.sets, f"model={model}", "optimization.precision=fp32",
                 f"optimization.gradient_checkpointing={str(not args.no_gradient_checkpointing).lower()}",
                 *([f"rounds={args.rounds}"] if args.rounds else [])]
    recipe = bench_recipe(RunSpec("check", args.recipe, overrides, ""))
    if "trl" in args.frameworks:
        trl_settings(recipe)  # an unmirrorable recipe fails before any run
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        for fw in args.frameworks:
            if (work / fw).exists():  # a finished alignpipe run there would be read back, not run
                raise SystemExit(f"{work / fw} exists: give an empty --work-dir")
            (work / fw).mkdir(parents=True)
            prompts_from = results["alignpipe"]["run_dir"] if fw == "trl" and "alignpipe" in results else None
            spec = RunSpec(fw, args.recipe, overrides, str(work / fw), prompts_from, args.threads)
            print(f"{fw}: {recipe.rounds} round(s) of {args.recipe} on {model} ...", flush=True)
            results[fw] = run_in_subprocess(spec, work)
            print("  " + ", ".join(f"{p['seconds']:.1f} s {p['accuracy']:.1%}" for p in results[fw]["points"]),
                  flush=True)
    figures = derived(results, args.target)
    print("\n" + table(results, figures))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(sys.argv), "model": model, "recipe": args.recipe, "overrides": overrides,
            "git": git_state(), "uptime": _dpo()._uptime(), "cpu": cpu_info()}
    args.out.write_text(json.dumps({"meta": meta, "derived": figures, "runs": results}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
