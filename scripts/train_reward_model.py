"""Train the Bradley-Terry reward model on hh-rlhf-harmless dev pairs (CPU, frozen backbone) and print
test accuracy.

    python scripts/train_reward_model.py [--pairs FILE] [--out DIR] [--train-fraction 0.6] [--seed 0]
                                         [--max-length 128] [--layers 6,9,12,15] [--limit N]

Split: a seeded shuffle of the pairs, then the first `train-fraction` for training and the rest for test.
The backbone is the embedded SmolLM2-135M-Instruct unless --backbone names a local model directory; it
stays frozen: features (last-token hidden states, one forward pass per sequence, cached) feed a linear
Bradley-Terry head. `--layers 6,9,12,15` lets the inner holdout of the training pairs pick how many decoder
layers the saved model keeps; `--layers all` keeps all of them. Inputs are chat-formatted and truncated on
the left to --max-length tokens.

Measured with the defaults on 2 shared (heavily loaded) CPU cores: features 1,675 s cold (one 15-layer
pass over 2,312 sequences; cached afterwards), head fit 13 s; the inner holdout chose 15 layers, l2 = 1;
train accuracy 0.713 (694 pairs), test accuracy 0.615 (462 pairs), test BT loss 0.645.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
DEFAULT_PAIRS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default=str(DEFAULT_PAIRS))
    ap.add_argument("--out", default="runs/rm-hh-harmless")
    ap.add_argument("--backbone", default=None, help="local HF model directory (default: the embedded model)")
    ap.add_argument("--train-fraction", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--layers", default="6,9,12,15", help="N, N,M,... (candidates) or 'all'")
    ap.add_argument("--l2", type=float, default=None, help="head L2 penalty (default: chosen on an inner holdout)")
    ap.add_argument("--center", type=float, default=0.0, help="reward-centering coefficient eta")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N pairs of the file")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-cache", action="store_true", help="do not cache features under ~/.cache/alignpipe")
    args = ap.parse_args(argv)

    import torch

    from alignpipe.data.pairs import load_pairs
    from alignpipe.evaluation.reward_model import split_pairs, train_reward_model
    from alignpipe.models import cache_dir, embedded_model_dir, resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pairs = load_pairs(args.pairs, limit=args.limit)
    train, test = split_pairs(pairs, args.train_fraction, args.seed)
    layers = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    backbone = resolve_model_path(args.backbone) if args.backbone else embedded_model_dir()
    metrics = train_reward_model(
        backbone, train, args.out, test_pairs=test, max_length=args.max_length, batch_size=args.batch_size,
        layers=layers, l2=args.l2, center_coef=args.center, seed=args.seed,
        feature_cache=None if args.no_cache else cache_dir() / "rm-features", show=sys.stderr.isatty(),
    )
    metrics.update(total_seconds=time.perf_counter() - start, torch_threads=torch.get_num_threads(),
                   split=f"seeded shuffle (seed {args.seed}) of {len(pairs)} pairs: "
                         f"first {len(train)} train, last {len(test)} test")
    (Path(args.out) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    print(f"test accuracy {metrics['test_accuracy']:.3f} on {len(test)} pairs "
          f"(train {metrics['train_accuracy']:.3f} on {len(train)}); {metrics['total_seconds']:.0f} s")
    return metrics


if __name__ == "__main__":
    main()
