"""Benchmark: what FSDP saves per process. One DPO round of full fine-tuning on the embedded model, on 2 processes
(accelerate's launcher, gloo on a CPU machine), once data-parallel and once under each FSDP example config.

Each process reports its peak RSS and its resident memory while training (the peak minus the memory before the
round, which holds the model, the tokenizer and the reference log-probs); the training steps are those of
`optimize()`, with the reference taken as the policy at the round's start (no frozen copy, so that the copy's
memory does not hide what sharding changes).

    .venv/bin/python benchmarks/fsdp_memory.py --pairs 16 --out bench-results/fsdp-memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = {"data-parallel": None, "fsdp-full-shard": "fsdp-full-shard.yaml",
           "fsdp-shard-grad-op": "fsdp-shard-grad-op.yaml"}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> None:
    """One process of the launched run: one round of `optimize()`; rank 0 gathers every rank's figures."""
    sys.path.insert(0, str(HERE))
    from dpo import DATA, fitting_pairs

    from alignpipe import distributed
    from alignpipe.config import OptimizationConfig
    from alignpipe.models import load_policy, load_tokenizer, resolve_model_path
    from alignpipe.optimization.trainer import optimize
    from alignpipe.records import PairExample
    from alignpipe.threads import configure_threads

    distributed.init()
    configure_threads()
    path = resolve_model_path(args.model, "merge")
    tokenizer = load_tokenizer(path)
    pairs, _ = fitting_pairs(DATA, tokenizer, args.max_length, args.pairs)
    examples = [PairExample(prompt=p.prompt, chosen=p.chosen, rejected=p.rejected, margin=1.0) for p in pairs]
    model = load_policy(path)
    cfg = OptimizationConfig(adapter=None, batch_size=args.batch_size, max_length=args.max_length, precision="fp32",
                             reference="round_start", measure_signal=False)
    before = _rss_mb()
    started = time.perf_counter()
    metrics = optimize(model, tokenizer, examples, cfg, seed=0)
    seconds = time.perf_counter() - started
    mine = {"rank": distributed.rank(), "peak_rss_mb": _rss_mb(), "before_mb": before,
            "training_mb": _rss_mb() - before, "seconds": seconds, "loss": metrics["loss"]}
    everyone = distributed.all_gather(mine)
    if distributed.is_main():
        Path(args.result).write_text(json.dumps(everyone))
    distributed.barrier()
    # leave without interpreter finalisation: under a test runner a worker sometimes aborted there ("terminate
    # called without an active exception", SIGABRT) after its figures were written
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(name: str, config: str | None, args: argparse.Namespace, work: Path) -> dict:
    result = work / f"{name}.json"
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    launch += ["--config_file", str(HERE.parent / "examples" / "accelerate" / config)] if config else \
        ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    from alignpipe.distributed import free_port

    launch += ["--num_processes", "2", "--main_process_port", str(free_port()), str(Path(__file__).resolve()), "--worker", "--result", str(result),
               "--pairs", str(args.pairs), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    if args.model:
        launch += ["--model", args.model]
    env = {**os.environ, "ALIGNPIPE_THREADS": str(args.threads)}
    subprocess.run(launch, check=True, env=env, stdout=subprocess.DEVNULL)
    return {"config": name, "ranks": json.loads(result.read_text())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2-135M)")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per step (global)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"fsdp-memory-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    results = [run(name, CONFIGS[name], args, work) for name in args.configs]
    print(f"{'config':<20} {'rank':>4} {'peak RSS MB':>12} {'training MB':>12} {'seconds':>8} {'loss':>8}")
    for res in results:
        for r in res["ranks"]:
            print(f"{res['config']:<20} {r['rank']:>4} {r['peak_rss_mb']:>12.0f} {r['training_mb']:>12.0f} "
                  f"{r['seconds']:>8.1f} {r['loss']:>8.4f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
