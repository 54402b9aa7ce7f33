"""Where a round's candidates come from: the policy, a teacher, the task's gold responses, the dataset's own
responses, or a mixture of them (survey section 4.1; `synthesis.source` / `synthesis.mixture`).

Every candidate records its source in `Candidate.source["source"]`, so that judges (`provenance`),
instantiation and the report can tell a teacher's answer from the policy's. Candidate ids are
`{prompt_id}/{n}`, numbered across the sources of a prompt in the order the recipe lists them.

Policy samples come from the recipe's backend (`synthesis.backend`); a teacher is a local model directory
(loaded once, transformers) or `URL#MODEL` of an OpenAI-compatible server.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from alignpipe import AlignpipeError
from alignpipe.config import SourceSpec, SynthesisConfig
from alignpipe.records import Candidate, Prompt
from alignpipe.synthesis.generators import Generator, build_generator, drop_failed
from alignpipe.synthesis.offline import offline_candidates
from alignpipe.synthesis.temperature import round_temperature, sample_temperatures
from alignpipe.synthesis.verbalized import verbalized_candidates, verbalized_prompt


def gold_response(prompt: Prompt) -> str | None:
    """The task's reference response for a prompt: GSM8K's worked solution, HumanEval's canonical solution,
    a preference pair's chosen response, a file task's `response` column, the arithmetic answer; None if none."""
    meta = prompt.meta
    for key in ("solution", "canonical_solution", "response"):
        if isinstance(meta.get(key), str) and meta[key].strip():
            return meta[key]
    for r in meta.get("responses") or []:
        if r.get("label") == "chosen":
            return r["completion"]
    if prompt.task == "math" and meta.get("expression") is not None and prompt.reference is not None:
        return prompt.reference  # arithmetic: the answer is the whole response the instruction asks for
    return None


def gold_candidates(prompts: list[Prompt]) -> list[Candidate]:
    out = []
    for p in prompts:
        text = gold_response(p)
        if text is None:
            raise AlignpipeError(f"prompt {p.id}: a self_play/gold source needs a gold response, and this prompt "
                                 f"has none (GSM8K solution, HumanEval canonical solution, chosen response)")
        out.append(Candidate(prompt_id=p.id, id=f"{p.id}/gold", completion=text, source={"source": "gold"}))
    return out


def round_temperatures(syn: SynthesisConfig, r: int, k: int, base: float | None = None) -> list[float]:
    """The temperature of each of a prompt's k samples in round r: a source's own temperature (`base`), else
    `temperature_schedule.rounds[r]` (the last value repeats), else `synthesis.temperature`; spread evenly over
    `per_sample` [low, high] when that is given."""
    sched = syn.temperature_schedule
    t = syn.temperature if base is None else base
    if base is None and sched is not None and sched.rounds:
        t = round_temperature(sched.rounds, r, r + 1)
    if sched is not None and sched.per_sample is not None:
        low, high = sched.per_sample
        return sample_temperatures({"lo": low, "hi": high}, k)
    return [t] * k


def split_server(ref: str) -> tuple[str, str]:
    """URL#MODEL -> (URL, MODEL)."""
    url, _, name = ref.partition("#")
    return url, name


def teacher_generator(ref: str, batch_size: int, api_key_env: str = "OPENAI_API_KEY") -> Generator:
    """The generator of a teacher: `URL#MODEL` of an OpenAI-compatible server, a local model directory, or a
    peft adapter directory (e.g. an earlier run's `final_model`), loaded on the base its adapter_config names."""
    if ref.startswith(("http://", "https://")):
        url, name = split_server(ref)
        return build_generator("openai", base_url=url, model=name, api_key_env=api_key_env)
    path = Path(ref).expanduser()
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise AlignpipeError(f"teacher adapter {ref}: its base model {base!r} (adapter_config.json) is not a "
                                 f"local directory")
        return build_generator("transformers", model=base, adapter=path, batch_size=batch_size,
                               model_name=str(path))
    return build_generator("transformers", model=path, batch_size=batch_size)


class CandidateSources:
    """Samples a round's candidates from the recipe's sources.

    `policy` is the generator of the current policy; `teacher(model_ref)` builds (once per model) the
    generator of a teacher. With `synthesis.verbalized: n`, policy samples are verbalized: ceil(k / n)
    responses per prompt, each asked for n distinct answers and parsed into candidates (at most k kept).
    After `candidates`, `stats` holds the round's sampling counts: failed (backend failures dropped) and,
    for verbalized sampling, the parse counts (invalid_rate, parse_rate, ...)."""

    def __init__(self, syn: SynthesisConfig, policy: Generator, teacher: Callable[[str], Generator]) -> None:
        self.syn, self.policy, self._teacher_factory = syn, policy, teacher
        self._teachers: dict[str, Any] = {}
        self.stats: dict[str, Any] = {}

    def teacher(self, ref: str) -> Any:
        if ref not in self._teachers:
            self._teachers[ref] = self._teacher_factory(ref)
        return self._teachers[ref]

    def _sample(self, spec: SourceSpec, prompts: list[Prompt], r: int, seed: int) -> list[Candidate]:
        syn = self.syn
        if spec.source == "gold":
            return gold_candidates(prompts)
        if spec.source == "offline":
            return [replace(c, source={**c.source, "source": "offline"}) for c in offline_candidates(prompts)]
        generator = self.policy if spec.source == "policy" else self.teacher(spec.model or "")
        temps = round_temperatures(syn, r, spec.k, spec.temperature)
        if spec.source == "policy" and syn.verbalized:
            return self._verbalized(prompts, spec.k, temps[0], r, seed)
        # one call per distinct temperature (each keeps its shared prefill); samples regrouped per prompt after
        by_temp: dict[float, int] = {}
        for t in temps:
            by_temp[t] = by_temp.get(t, 0) + 1
        per_prompt: dict[str, list[Candidate]] = {p.id: [] for p in prompts}
        for n, (t, k) in enumerate(by_temp.items()):
            out = generator.sample(prompts, k, temperature=t, top_p=syn.top_p, max_new_tokens=syn.max_new_tokens,
                                   seed=seed + 1000 * n, source={"source": spec.source, "round": r},
                                   description=f"round {r}: sampling ({spec.source}, T={t:g})")
            for c in out:
                per_prompt[c.prompt_id].append(c)
        return [c for p in prompts for c in per_prompt[p.id]]

    def _verbalized(self, prompts: list[Prompt], k: int, temperature: float, r: int, seed: int) -> list[Candidate]:
        """Verbalized sampling (arXiv 2510.01171): each response lists n answers; n answers' worth of tokens."""
        n = self.syn.verbalized
        per_prompt = math.ceil(k / n)
        asked = [replace(p, prompt=verbalized_prompt(p.prompt, n), meta={k_: v for k_, v in p.meta.items()
                                                                       if k_ != "messages"}) for p in prompts]
        responses = self.policy.sample(asked, per_prompt, temperature=temperature, top_p=self.syn.top_p,
                                       max_new_tokens=self.syn.max_new_tokens * n, seed=seed,
                                       source={"source": "policy", "round": r},
                                       description=f"round {r}: verbalized sampling (n={n}, T={temperature:g})")
        responses, failed = drop_failed(responses)
        self.stats["failed"] = self.stats.get("failed", 0) + failed
        by_id = {p.id: p for p in prompts}
        cands, stats = verbalized_candidates([by_id[c.prompt_id] for c in responses], responses, n)
        self.stats["verbalized"] = stats
        kept: dict[str, list[Candidate]] = {p.id: [] for p in prompts}
        for c in cands:
            if len(kept[c.prompt_id]) < k:
                kept[c.prompt_id].append(c)
        return [c for p in prompts for c in kept[p.id]]

    def candidates(self, prompts: list[Prompt], r: int, seed: int) -> list[Candidate]:
        """Every source's candidates for `prompts`, grouped per prompt, renumbered `{prompt_id}/{n}`; samples a
        backend failed to produce are dropped and counted in `stats["failed"]`."""
        self.stats = {"failed": 0}
        per_prompt: dict[str, list[Candidate]] = {p.id: [] for p in prompts}
        for n, spec in enumerate(self.syn.source_specs()):
            sampled, failed = drop_failed(self._sample(spec, prompts, r, seed + 7919 * n))
            self.stats["failed"] += failed
            for c in sampled:
                per_prompt[c.prompt_id].append(c)
        return [replace(c, id=f"{p.id}/{j}") for p in prompts for j, c in enumerate(per_prompt[p.id])]


def sampling_shard_prompts(syn: SynthesisConfig) -> int:
    """Prompts per sampling shard: about four sampling batches of rows, so a shard keeps its batches full
    and a killed run loses at most four batches of sampling."""
    rows_per_prompt = sum(spec.k for spec in syn.source_specs())
    return max(1, 4 * syn.batch_size // max(rows_per_prompt, 1))


def merge_sampling_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """A round's sampling counts from its shards' (`CandidateSources.stats` of each): counts add up and
    verbalized sampling's rates are recomputed from the summed counts."""
    if not parts:
        return {}
    out: dict[str, Any] = {"failed": sum(p.get("failed", 0) for p in parts)}
    verbalized = [p["verbalized"] for p in parts if "verbalized" in p]
    if verbalized:
        v = {k: sum(x.get(k, 0) for x in verbalized) for k in verbalized[0] if not k.endswith("_rate")}
        v["invalid_rate"] = v["invalid"] / v["responses"] if v.get("responses") else 0.0
        v["parse_rate"] = v["parsed"] / v["expected"] if v.get("expected") else 0.0
        out["verbalized"] = v
    return out
