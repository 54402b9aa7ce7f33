"""Rounds of the closed loop: synthesis -> evaluation -> instantiation -> optimization -> next round.

Every stage reads and writes files in the run directory. A stage whose output exists with the same
fingerprint is read back instead of recomputed, so a killed run started again resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
import random
import resource
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from alignpipe import AlignpipeError, distributed, killpoints
from alignpipe.config import Recipe
from alignpipe.data import load_task
from alignpipe.diagnostics.heldout import heldout_perplexity, pair_preference, paired_difference
from alignpipe.diagnostics.protocols import run_protocols
from alignpipe.diagnostics.report import write_report
from alignpipe.diagnostics.rounds import write_round_diagnostics
from alignpipe.diagnostics.winrate import heldout_winrate
from alignpipe.evaluation import judge_candidates
from alignpipe.evaluation.verifiers import ANSWER_CHECKERS
from alignpipe.instantiation import build_examples, score_of
from alignpipe.instantiation.round_selection import select_examples
from alignpipe.instantiation.selection_inputs import pair_logps
from alignpipe.judging import LoopJudges, ensure_reward_models, judge_stats
from alignpipe.killpoints import killpoint
from alignpipe.launch import check_processes
from alignpipe.metering import StageMeter
from alignpipe.models import (
    adapter_base,
    attach_adapter,
    load_checkpoint,
    load_policy,
    load_tokenizer,
    resolve_model_path,
    save_checkpoint,
)
from alignpipe.optimization import sharding
from alignpipe.optimization.objectives import OBJECTIVES
from alignpipe.optimization.trainer import optimize, round_providers
from alignpipe.precision import describe as describe_precision
from alignpipe.recipe_io import ROUND_SECTIONS, check_resumable
from alignpipe.records import (
    Candidate,
    Judgment,
    Prompt,
    remove_temporaries,
    write_json,
    write_records,
)
from alignpipe.stages import cached_stage, dynamic_sampling, sharded_stage
from alignpipe.synthesis.diversity import round_diversity
from alignpipe.synthesis.generators import Generator, build_generator
from alignpipe.synthesis.sources import (
    CandidateSources,
    gold_response,
    merge_sampling_stats,
    sampling_shard_prompts,
    split_server,
    teacher_generator,
)
from alignpipe.synthesis.transformers_backend import generate, render_prompt

SHARD_SEED_STRIDE = 100_003  # sampling shard i draws from seed + i * stride: apart from dynamic sampling's offsets


def heldout_greedy(model, tokenizer, prompts: list[Prompt], recipe: Recipe, path: Path, fingerprint: str,  # noqa: ANN001
                   label: str) -> list[Candidate]:
    """The policy's greedy answers to the held-out prompts, cached beside the run."""
    h = recipe.heldout

    def compute() -> list[Candidate]:
        if distributed.world_size() == 1:
            return generate(model, tokenizer, prompts, 1, 0.0, 1.0, h.max_new_tokens, h.batch_size, recipe.seed,
                            {"eval": label}, f"held-out eval ({label})")
        # the prompts in the order generate() batches them (by rendered length), cut into its batches: each
        # process takes whole batches, so every batch pads exactly as in one process
        order = sorted(range(len(prompts)), key=lambda i: len(render_prompt(tokenizer, prompts[i])))
        answers = distributed.map_chunks(order, h.batch_size, lambda chunk, _index: generate(
            model, tokenizer, [prompts[i] for i in chunk], 1, 0.0, 1.0, h.max_new_tokens, h.batch_size,
            recipe.seed, {"eval": label}, f"held-out eval ({label})"))
        by_prompt = dict(zip(order, answers, strict=True))
        return [by_prompt[i] for i in range(len(prompts))]

    return cached_stage(path / f"eval-{label}-candidates.parquet", fingerprint, Candidate, compute)


def heldout_accuracy(model, tokenizer, prompts: list[Prompt], recipe: Recipe, path: Path, fingerprint: str,  # noqa: ANN001
                     label: str, judge: Any) -> dict[str, Any]:
    """Greedy accuracy on the held-out prompts (a judgment that is not ok counts as wrong); per-problem
    results are kept for paired statistics."""
    candidates = heldout_greedy(model, tokenizer, prompts, recipe, path, fingerprint, label)
    judgments = judge_candidates(judge, prompts, candidates)
    correct = [score_of(j) if j.status == "ok" else 0.0 for j in judgments]
    return {"accuracy": sum(correct) / len(correct), "n": len(correct), "correct": correct,
            "candidates": candidates, "metric": "greedy_pass@1" if judge.name == "code_verifier" else "greedy_accuracy"}


@dataclass
class _Session:
    """What every round needs: the recipe, the policy and where to write."""

    recipe: Recipe
    run_dir: Path
    model: Any
    tokenizer: Any
    model_path: Path
    reference_model: Any
    console: Console
    providers: list = field(default_factory=list)  # input providers (heads) kept across rounds
    judges: LoopJudges | None = None
    # no gold answer to check (or a heldout.judge asked for): the held-out metric is a judged win rate of the
    # final policy against the round-0 policy
    chat_task: bool = False
    sources: CandidateSources | None = None
    pool: list[Prompt] = field(default_factory=list)  # the shuffled training prompts

    @property
    def heldout_verifier(self) -> str:
        """Held-out accuracy is checked by a verifier: the recipe's judge when it is one, else the task's."""
        judge = self.recipe.evaluation.judge
        if judge in ANSWER_CHECKERS:
            return judge
        return "code_verifier" if self.recipe.task.kind == "humaneval" else "math_verifier"

    def chat(self, prompt: Prompt) -> str:
        """The prompt through the chat template, as the sampler renders it; multi-turn prompts keep their turns."""
        return render_prompt(self.tokenizer, prompt)

    def heldout(self, prompts: list[Prompt], fingerprint: str, label: str) -> dict[str, Any]:
        if self.recipe.task.kind == "instructions":  # the demonstrations' loss; answers too when a judge compares
            out = heldout_perplexity(self.model, self.tokenizer, prompts, self.recipe.optimization.max_length)
            if self.chat_task:
                out["candidates"] = heldout_greedy(self.model, self.tokenizer, prompts, self.recipe, self.run_dir,
                                                   fingerprint, label)
            return out
        if self.chat_task:  # answers kept for the win rate; preference tasks also score the human pairs
            answers = heldout_greedy(self.model, self.tokenizer, prompts, self.recipe, self.run_dir, fingerprint,
                                     label)
            out = {"accuracy": None, "n": len(prompts), "correct": [], "candidates": answers, "metric": "win_rate"}
            if self.recipe.task.kind == "preferences":
                out.update(pair_preference(self.model, self.tokenizer, prompts, self.chat,
                                           self.recipe.optimization.max_length))
                out["candidates"] = answers
            return out
        if self.recipe.task.kind == "preferences":
            return pair_preference(self.model, self.tokenizer, prompts, self.chat, self.recipe.optimization.max_length)
        judge = self.judges.registry.resolve(self.heldout_verifier)
        return heldout_accuracy(self.model, self.tokenizer, prompts, self.recipe, self.run_dir, fingerprint, label,
                                judge)

    def sample(self, prompts: list[Prompt], r: int, seed_offset: int = 0) -> list[Candidate]:
        return self.sources.candidates(prompts, r, self.recipe.seed + r + seed_offset)

    def sample_round(self, prompts: list[Prompt], r: int, rd: Path, fingerprint: str,
                     ) -> tuple[list[Candidate], dict[str, Any]]:
        """The round's candidates and sampling counts, sampled shard by shard into round-NN/candidates-shards/
        (each shard seeded by its index, its counts kept beside it): a run killed mid-sampling resumes at the
        shard it was in, with the same rows as an uninterrupted run."""
        shard_dir, size = rd / "candidates-shards", sampling_shard_prompts(self.recipe.synthesis)

        def shard(shard_prompts: list[Prompt], index: int) -> list[Candidate]:
            return self.sample(shard_prompts, r, seed_offset=SHARD_SEED_STRIDE * index)

        candidates = cached_stage(rd / "candidates.parquet", fingerprint, Candidate, lambda: sharded_stage(
            shard_dir, fingerprint, Candidate, prompts, size, shard, stats=lambda: self.sources.stats))
        stats_files = [shard_dir / f"{i:05d}.stats.json" for i in range(-(-len(prompts) // size))]
        return candidates, merge_sampling_stats([json.loads(f.read_text()) for f in stats_files if f.is_file()])

    def fresh_prompts(self, r: int, used: int, n: int) -> list[Prompt]:
        """Dynamic sampling's fresh prompts for round r: taken after every round's regular prompts, each
        round with its own stretch of the pool (so a resumed run draws the same ones)."""
        syn = self.recipe.synthesis
        start = self.recipe.rounds * syn.prompts_per_round + r * syn.prompts_per_round * syn.dynamic_sampling + used
        return [self.pool[(start + i) % len(self.pool)] for i in range(n)]

    def greedy_baselines(self, prompts: list[Prompt], r: int, rd: Path, fingerprint: str) -> dict[str, float]:
        """ReMax's baseline b(x) = r(x, greedy decode) (arXiv 2310.10505): per prompt, one temperature-0 decode
        of the round-start policy, judged like the samples; both stages cached beside them."""
        syn, recipe = self.recipe.synthesis, self.recipe
        greedy = cached_stage(rd / "baseline-candidates.parquet", fingerprint, Candidate, lambda: [
            replace(c, id=f"{c.prompt_id}/greedy") for c in generate(
                self.model, self.tokenizer, prompts, 1, 0.0, 1.0, syn.max_new_tokens, syn.batch_size, recipe.seed + r,
                {"model": str(self.model_path), "round": r, "greedy": True}, f"round {r}: greedy baseline")])
        judge = self.judges.registry.resolve(recipe.evaluation.judge)
        judgments = cached_stage(rd / "baseline-judgments.parquet", fingerprint, Judgment,
                                 lambda: self.judge(judge, prompts, greedy, r))
        return {j.prompt_id: score_of(j, recipe.instantiation.score) for j in judgments if len(j.candidate_ids) == 1
                and j.status == "ok"}

    def judge(self, judge: Any, prompts: list[Prompt], candidates: list[Candidate], r: int) -> list[Judgment]:
        ev = self.recipe.evaluation

        def judge_part(part: list[Prompt], _index: int = 0) -> list[Judgment]:
            ids = {p.id for p in part}
            return judge_candidates(judge, part, [c for c in candidates if c.prompt_id in ids],
                                    max_comparisons=ev.max_comparisons, aggregate=ev.aggregate,
                                    both_orders=ev.both_orders, seed=self.recipe.seed + r)

        if distributed.world_size() == 1:
            return judge_part(prompts)
        # several processes: each judges whole prompts; per-candidate judgments first, in candidate order, then
        # the pairwise judges' raw verdicts, as one process returns them
        judged = distributed.map_chunks(prompts, sampling_shard_prompts(self.recipe.synthesis), judge_part)
        single = {j.candidate_ids[0]: j for j in judged if len(j.candidate_ids) == 1}
        return [single[c.id] for c in candidates] + [j for j in judged if len(j.candidate_ids) != 1]


def _run_round(s: _Session, r: int, prompts: list[Prompt], fingerprint: str) -> dict[str, Any]:
    """One round of the four stages; each stage's output is cached under round-NN/."""
    recipe, rd = s.recipe, s.run_dir / f"round-{r:02d}"
    meter = StageMeter()
    if distributed.is_main():
        write_records(rd / "prompts.parquet", prompts, Prompt)
    with meter.stage("sampling"):
        candidates, sampling_stats = s.sample_round(prompts, r, rd, fingerprint)
    judge = s.judges.for_round(rd, fingerprint)
    with meter.stage("judging"):
        judgments = cached_stage(rd / "judgments.parquet", fingerprint, Judgment,
                                 lambda: s.judge(judge, prompts, candidates, r), redo=lambda js: any(
                                     j.status != "ok" for j in js))  # a rerun asks again what failed
    diversity = round_diversity(candidates, embedding=recipe.synthesis.embedding_diversity)
    dynamic = None
    if recipe.synthesis.dynamic_sampling:
        with meter.stage("dynamic_sampling"):
            prompts, candidates, judgments, dynamic = dynamic_sampling(
                rd, fingerprint, prompts, candidates, judgments, fresh_prompts=lambda used, n: s.fresh_prompts(r, used, n),
                sample=lambda ps, offset: s.sample(ps, r, offset), judge=lambda ps, cs: s.judge(judge, ps, cs, r),
                max_passes=recipe.synthesis.dynamic_sampling, dim=recipe.instantiation.score)
    with meter.stage("judging"):
        reads_baseline = any("baseline_rewards" in OBJECTIVES[t.name].inputs for t in recipe.optimization.objectives)
        baselines = s.greedy_baselines(prompts, r, rd, fingerprint) if reads_baseline else None
    with meter.stage("instantiation"):
        examples, stats, cls = build_examples(recipe.instantiation, prompts, candidates, judgments, s.chat,
                                              recipe.seed + r, baselines)
        selection = None
        if recipe.instantiation.selection is not None:
            examples, selection = select_examples(
                recipe.instantiation.selection, examples, candidates, judgments, recipe.seed + r,
                logps=lambda ex: pair_logps(s.model, s.tokenizer, ex, recipe.optimization, s.reference_model),
                dim=recipe.instantiation.score)
        if distributed.is_main():
            write_records(rd / "examples.parquet", examples, cls)
    with meter.stage("training"):
        train = optimize(s.model, s.tokenizer, examples, recipe.optimization, seed=recipe.seed + r,
                         reference_model=s.reference_model, providers=s.providers)
    if distributed.is_main():
        save_checkpoint(s.model, s.tokenizer, rd / "checkpoint")
        for provider in s.providers:
            provider.save(rd / "checkpoint")
        killpoint("checkpoint.fingerprint")
        (rd / "checkpoint.fingerprint").write_text(fingerprint)
    distributed.barrier()
    _policy_moved(s, rd / "checkpoint")
    scores = [score_of(j, recipe.instantiation.score) for j in judgments if len(j.candidate_ids) == 1
              and j.status == "ok"]
    metrics = {
        "round": r, "prompts": len(prompts), "candidates": len(candidates),
        "sample_reward": sum(scores) / max(len(scores), 1), "judge": judge_stats(judgments),
        "mean_tokens": sum(c.num_tokens or 0 for c in candidates) / max(len(candidates), 1),
        "judgments_not_ok": stats.judgments_not_ok, "examples": stats.examples,
        "skipped_uniform": stats.skipped_uniform, "skipped_margin": stats.skipped_margin,
        "skipped_incomplete": stats.skipped_incomplete,
        **({"instantiation": stats.extra} if stats.extra else {}),
        "diversity": diversity,
        **({"sampling": sampling_stats} if sampling_stats else {}),
        **({"dynamic_sampling": dynamic} if dynamic is not None else {}),
        **({"selection": selection} if selection is not None else {}),
        "train": train,
        "stage_seconds": meter.seconds, "stage_peak_rss_mb": meter.peak_rss_mb,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
    }
    if distributed.is_main():
        write_json(rd / "metrics.json", metrics)
        write_round_diagnostics(rd)
    distributed.barrier()
    s.console.print(f"round {r}: sample reward {metrics['sample_reward']:.3f}, {stats.examples} "
                    f"{recipe.instantiation.kind} examples ({stats.skipped_uniform} prompts all tied), "
                    f"loss {train.get('loss', float('nan')):.4f}")
    return metrics


def _policy_moved(s: _Session, checkpoint: Path) -> None:
    """A backend that holds its own copy of the policy loads the round's adapter: vLLM in process (every
    process its own engine), a server (pushed once, by the main process; the others sample it by name)."""
    syn = s.recipe.synthesis
    set_adapter = getattr(s.sources.policy, "set_adapter", None)
    if set_adapter is None or s.recipe.optimization.adapter is None:
        return
    if syn.backend != "openai":
        set_adapter(checkpoint)
    elif syn.server_adapter == "push":
        if distributed.is_main():
            set_adapter(checkpoint)
        distributed.barrier()
        if not distributed.is_main():
            set_adapter(checkpoint, load=False)


def policy_generator(recipe: Recipe, model: Any, tokenizer: Any, model_path: Path) -> Generator:
    """The generator of the policy being trained, on the recipe's backend."""
    syn = recipe.synthesis
    if syn.backend == "openai":
        url, name = split_server(syn.server or "")
        return build_generator("openai", base_url=url, model=name, api_key_env=syn.api_key_env)
    if syn.backend == "vllm":
        return build_generator("vllm", model=str(model_path), seed=recipe.seed)
    return build_generator("transformers", model=model, tokenizer=tokenizer, batch_size=syn.batch_size,
                           model_name=str(model_path))


def _round_done(rd: Path, fingerprint: str) -> bool:
    stamp = rd / "checkpoint.fingerprint"
    return (rd / "checkpoint").is_dir() and stamp.is_file() and stamp.read_text() == fingerprint \
        and (rd / "metrics.json").is_file()


def _resume_round(s: _Session, r: int, rd: Path) -> dict[str, Any]:
    """A round finished earlier: load its checkpoint (the policy and the providers' saved state, e.g. heads)
    and read its metrics back."""
    load_checkpoint(s.model, rd / "checkpoint")
    for provider in s.providers:
        provider.load(rd / "checkpoint")
    _policy_moved(s, rd / "checkpoint")
    s.console.print(f"round {r}: done earlier, loaded {rd / 'checkpoint'}")
    return yaml.safe_load((rd / "metrics.json").read_text())


def run(recipe: Recipe, console: Console | None = None) -> dict[str, Any]:
    """Run (or resume) the closed loop of `recipe`; returns the summary written to summary.json."""
    console = console or Console()
    run_dir = Path(recipe.output_dir) / recipe.name
    base_fp = recipe.fingerprint(*ROUND_SECTIONS)
    check_resumable(recipe, run_dir)  # issue 12: a changed recipe must not redo (or mix into) finished rounds
    eval_fp = recipe.fingerprint("model", "seed", "task", "evaluation", "heldout")

    data = load_task(recipe.task, recipe.heldout.n)  # bad prompt files fail before any model work
    if recipe.synthesis.uses("gold"):
        missing = next((p for p in data.train if gold_response(p) is None), None)
        if missing is not None:
            raise AlignpipeError(f"synthesis.source {recipe.synthesis.source!r} needs a gold response for every "
                                 f"prompt; prompt {missing.id} has none (a file task gives it as `response`)")
    continue_adapter = recipe.model_adapter == "continue" and recipe.model is not None \
        and adapter_base(Path(recipe.model).expanduser()) is not None
    if continue_adapter and recipe.optimization.adapter is None:
        raise AlignpipeError(f"model_adapter: continue trains the adapter {recipe.model} on; optimization.adapter "
                             f"is null (full fine-tuning): set model_adapter: merge, or an adapter")
    check_processes(recipe, distributed.world_size())
    fsdp = sharding.from_environment() if distributed.world_size() > 1 else None  # a bad FSDP config fails here
    with distributed.main_first():  # a merged adapter is cached once, by the main process
        model_path = resolve_model_path(recipe.model, "base" if continue_adapter else "merge")
    tokenizer = load_tokenizer(model_path)
    # only now, with data and model known good: a rerun that fails at load leaves a finished run's config.yaml
    # as it was, and a first run that fails at load leaves no directory behind
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AlignpipeError(f"output_dir {recipe.output_dir!r}: cannot create {run_dir} ({exc.strerror})") from None
    if distributed.is_main():
        removed = remove_temporaries(run_dir)  # what a killed write left behind (one run per directory at a time)
        if removed:
            console.print(f"removed {removed} temporary file(s) a killed run left in {run_dir}")
        (run_dir / "config.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    distributed.barrier()
    pool = list(data.train)
    random.Random(recipe.seed).shuffle(pool)
    per_round = recipe.synthesis.prompts_per_round
    if len(pool) < recipe.rounds * per_round:
        console.print(f"[yellow]note: {len(pool)} training prompts for {recipe.rounds * per_round} slots: prompts repeat")
    console.print(f"[bold]{recipe.name}[/]: model {model_path}, {len(pool)} training prompts, "
                  f"{len(data.heldout)} held-out, {recipe.rounds} round(s), "
                  f"{describe_precision(recipe.optimization.precision, 'cuda' if torch.cuda.is_available() else 'cpu')}, "
                  f"{torch.get_num_threads()} torch threads"
                  + (f" in each of {distributed.world_size()} processes" if distributed.world_size() > 1 else "")
                  + (f", {fsdp.describe()}" if fsdp else ""))

    # on this process's accelerator from the start, so the held-out evaluation, sampling and the reference passes
    # run there too, not only training
    model = load_policy(model_path, adapter=recipe.model if continue_adapter else None).to(distributed.device())
    opt = recipe.optimization
    # Full fine-tuning against the frozen base needs the base itself; adapters get it by disabling them.
    needs_copy = opt.adapter is None and opt.reference == "base" and any(
        OBJECTIVES[t.name].needs_reference for t in opt.objectives)
    reference_model = copy.deepcopy(model).eval().requires_grad_(False) if needs_copy else None
    # the providers the objectives read, made now (not in the first optimize) so that a resumed run can
    # load their saved state (heads) from the last finished round; the trainer reuses these instances
    providers = round_providers([OBJECTIVES[t.name] for t in opt.objectives], recipe.instantiation.kind, opt, [])
    session = _Session(recipe, run_dir, model, tokenizer, model_path, reference_model, console, providers)
    with distributed.main_first():  # reward models trained once, by the main process, into the shared cache
        ensure_reward_models(recipe.evaluation, console, recipe.seed)
    session.judges = LoopJudges(recipe, lambda: session.model, tokenizer, model_path, reference_model)
    protocols = recipe.heldout.protocols
    session.chat_task = recipe.heldout.judge is not None or (
        "utility" in protocols if recipe.task.kind == "instructions" else
        not recipe.synthesis.uses("offline") and not any(p.reference for p in data.heldout))
    with killpoints.scope("heldout-before"):
        before = session.heldout(data.heldout, eval_fp, "before")
        before["protocols"] = run_protocols(session.model, tokenizer, recipe, run_dir, eval_fp, "before",
                                            session.judges.registry.resolve)
    if before.get("perplexity") is not None:
        console.print(f"held-out completion loss before: {before['loss']:.4f} (perplexity {before['perplexity']:.2f}, "
                      f"n={before['n']})")
    elif not session.chat_task:
        console.print(f"held-out accuracy before: {before['accuracy']:.1%} (n={before['n']})")
    torch.manual_seed(recipe.seed)  # the adapter's initial weights, whatever the held-out eval drew before
    session.model = model if continue_adapter else attach_adapter(model, opt.adapter)
    parameters = {"trainable": sum(p.numel() for p in session.model.parameters() if p.requires_grad),
                  "total": sum(p.numel() for p in session.model.parameters())}
    session.pool = pool
    syn = recipe.synthesis
    session.sources = CandidateSources(syn, policy_generator(recipe, session.model, tokenizer, model_path),
                                       lambda ref: teacher_generator(ref, syn.batch_size, syn.api_key_env))

    rounds = []
    for r in range(recipe.rounds):
        rd, fp = run_dir / f"round-{r:02d}", f"{base_fp}:{r}"
        torch.manual_seed(recipe.seed + r)
        if _round_done(rd, fp):
            rounds.append(_resume_round(session, r, rd))
            continue
        start = r * per_round
        prompts = [pool[(start + i) % len(pool)] for i in range(per_round)]
        with killpoints.scope(f"round-{r:02d}"):
            rounds.append(_run_round(session, r, prompts, fp))

    after_fp = f"{base_fp}:{recipe.rounds}:{eval_fp}"  # the final policy's evaluations: every round and the eval
    with killpoints.scope("heldout-after"):
        after = session.heldout(data.heldout, after_fp, "after")
        after["protocols"] = run_protocols(session.model, tokenizer, recipe, run_dir, after_fp, "after",
                                           session.judges.registry.resolve)
    final = run_dir / "final_model"
    if distributed.is_main():
        save_checkpoint(session.model, tokenizer, final)
    wants_winrate = session.chat_task or ("utility" in protocols and "candidates" in before)
    if wants_winrate:
        judge = session.judges.heldout_judge(run_dir, after_fp)
        winrate = heldout_winrate(judge, data.heldout, before["candidates"], after["candidates"])
        if distributed.is_main():
            write_json(run_dir / "heldout-winrate.json", winrate)
        console.print(f"held-out win rate of the final policy against round 0 ({judge.name}): "
                      f"{winrate['win_rate']:.1%} [{winrate['ci95_low']:.1%}, {winrate['ci95_high']:.1%}] (n={winrate['n']})")
    summary = {
        "name": recipe.name,
        "heldout_metric": before.get("metric", "greedy_accuracy"),
        "before": {k: before[k] for k in ("accuracy", "n", "loss", "perplexity") if k in before},
        "after": {k: after[k] for k in ("accuracy", "n", "loss", "perplexity") if k in after},
        **(paired_difference(before["correct"], after["correct"]) if before["correct"] else {}),
        **({"loss_" + k: v for k, v in paired_difference(before["example_loss"], after["example_loss"]).items()}
           if before.get("example_loss") else {}),
        **({"heldout_winrate": {k: v for k, v in winrate.items() if k != "outcomes"}} if wants_winrate else {}),
        **({"protocols": {name: {"before": before["protocols"][name], "after": after["protocols"][name]}
                          for name in before["protocols"]}} if before["protocols"] else {}),
        "rounds": rounds,
        "parameters": parameters,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # the whole run, Linux: KiB
        "final_model": str(final.resolve()),
        "base_model": str(Path(model_path).resolve()),
    }
    if not distributed.is_main():
        return summary
    write_json(run_dir / "summary.json", summary)
    try:  # the run's results are written; a report that fails to render must not fail the run
        console.print(f"report: {write_report([run_dir], run_dir / 'report.html')}")
    except Exception as exc:  # noqa: BLE001
        console.print(f"[yellow]warning: report.html not written: {type(exc).__name__}: {exc}")
    return summary
