"""The loop's judges: the one judge registry (`evaluation.judge_registry`) bound to the run's live models,
the reward-model stage a recipe may ask for, and the held-out win rate of chat tasks.

- `policy` is the policy being trained, judging its own samples (Self-Rewarding LMs, arXiv 2401.10020);
  `reference` is its frozen base: the policy with adapters disabled, the frozen copy kept for full
  fine-tuning, or else a copy loaded once from the model path.
- Every round the registry gets a fresh judgment store in `round-NN/judge-cache/`: a policy-backed judge
  never answers from an earlier round's policy, and a rerun of a killed round asks again only the judgments
  that were not `ok` (a judge server that was down, an unparseable answer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from alignpipe import distributed
from alignpipe.config import EvaluationConfig, Recipe
from alignpipe.evaluation.judge_registry import JudgeRegistry
from alignpipe.records import Judgment

DEFAULT_HELDOUT_JUDGE = "rubric:reference"  # the best model-free-of-training judge we ship (docs/judges.md)


def reward_model_dirs(spec: str) -> list[str]:
    """Every `reward-model:DIR` directory named in a spec (ensemble members included)."""
    return [piece.split("+")[0].strip() for piece in spec.split("reward-model:")[1:]]


def ensure_reward_models(cfg: EvaluationConfig, console: Console, seed: int) -> None:
    """Train each `reward-model:DIR` of the judge whose DIR is missing, from `reward_model_pairs`
    (a Bradley-Terry head on the embedded model's features: `alignpipe train-reward-model --layers 6,9,12,15`)."""
    for directory in reward_model_dirs(cfg.judge):
        if Path(directory).is_dir():
            continue
        from alignpipe.evaluation.reward_training import train_reward_model_command

        console.print(f"training reward model {directory} on {cfg.reward_model_pairs} ...")
        # the first 6/9/12/15 decoder layers, picked on an inner holdout (docs/judges.md: 15 on hh-rlhf):
        # half a forward pass per scored response, for the features here and for every judgment after
        metrics = train_reward_model_command(cfg.reward_model_pairs, directory, seed=seed,
                                             limit=cfg.reward_model_limit, layers="6,9,12,15")
        console.print(f"reward model {directory}: test accuracy {metrics.get('test_accuracy', float('nan')):.3f} "
                      f"on {metrics.get('test_pairs', '?')} held-out pairs")


class LoopJudges:
    """The registry of one run, with `policy` and `reference` bound to the session's models."""

    def __init__(self, recipe: Recipe, get_policy: Callable[[], Any], tokenizer: Any, model_path: Path,
                 frozen_reference: Any = None) -> None:
        from alignpipe.synthesis.backends import LiveModelBackend, TransformersBackend

        ev = recipe.evaluation
        policy_name = Path(model_path).name

        def reference() -> Any:
            if frozen_reference is not None:
                return LiveModelBackend(lambda: frozen_reference, tokenizer, f"{policy_name}[reference]",
                                        seed=recipe.seed)
            if hasattr(get_policy(), "disable_adapter") or recipe.optimization.adapter is not None:
                # adapters are attached after the round-0 held-out eval: decide at each call
                def disabled() -> contextlib.AbstractContextManager:
                    model = get_policy()
                    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()

                return LiveModelBackend(get_policy, tokenizer, f"{policy_name}[reference]", seed=recipe.seed,
                                        context=disabled)
            return TransformersBackend(model_path, seed=recipe.seed, name=f"{policy_name}[reference]")

        models = {"policy": lambda: LiveModelBackend(get_policy, tokenizer, f"{policy_name}[policy]",
                                                     seed=recipe.seed),
                  "reference": reference}
        self.registry = JudgeRegistry(ev.llm_options(), models=models, default_model=ev.model,
                                      api_key_env=ev.api_key_env,
                                      cross_family_with=policy_name if ev.cross_family else None,
                                      step_options=ev.step_options())
        self.recipe = recipe

    def for_round(self, round_dir: Path, fingerprint: str) -> Any:
        """The recipe's judge for one round, remembering its judgments in `round_dir/judge-cache`."""
        self.registry.new_store(_store_dir(round_dir / "judge-cache", fingerprint))
        return self.registry.resolve(self.recipe.evaluation.judge)

    def heldout_judge(self, run_dir: Path, fingerprint: str) -> Any:
        self.registry.new_store(_store_dir(run_dir / "heldout-judge-cache", fingerprint))
        return self.registry.resolve(self.recipe.heldout.judge or DEFAULT_HELDOUT_JUDGE)


def _store_dir(directory: Path, fingerprint: str) -> Path | None:
    """`directory` for a judgment store written under `fingerprint`, emptied first if it holds judgments made
    under another config: a store's key is the judge's name and the judged text, not the policy that judged,
    so a policy judge's answers from another config's round would otherwise be read back as this one's."""
    import shutil

    if not distributed.is_main():  # only the main process writes the run directory: the others remember in memory
        return None
    stamp = directory / "FINGERPRINT"
    if directory.is_dir() and (not stamp.is_file() or stamp.read_text() != fingerprint):
        shutil.rmtree(directory)
    if not directory.is_dir():
        directory.mkdir(parents=True)
        stamp.write_text(fingerprint)
    return directory


def judge_stats(judgments: list[Judgment]) -> dict[str, Any]:
    """Per round: how the judge did. Invalid/error rates over the per-candidate judgments (and over the raw
    pairwise verdicts of a pairwise judge, with their both-order consistency)."""
    single = [j for j in judgments if len(j.candidate_ids) == 1]
    raw = [j for j in judgments if len(j.candidate_ids) == 2]
    n = max(len(single), 1)
    out: dict[str, Any] = {"judge": judgments[0].judge if judgments else None,
                           "invalid_rate": sum(j.status == "invalid" for j in single) / n,
                           "error_rate": sum(j.status == "error" for j in single) / n}
    if raw:
        from alignpipe.evaluation.pairwise_groups import pairwise_stats

        out["pairwise"] = pairwise_stats(raw)
    return out
