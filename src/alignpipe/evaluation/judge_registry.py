"""Judges by name, for `alignpipe judge-eval --judge SPEC` (and anything else that names judges in text).

    longer | shorter                        baselines: prefer the longer / shorter response (pointwise)
    reward-model:DIR                        a local sequence classifier (`RewardModelJudge`)
    pairwise[:BACKEND]                      LLM judges from `evaluation.llm_judge`: pairwise A/B/tie,
    pointwise[:BACKEND]                     1-10 score, Prometheus rubric, additive 0-5
    rubric[:BACKEND]
    additive[:BACKEND]
    atomic[:BACKEND]                        `atomic.AtomicLLMJudge`: a 1-10 score per sentence, in context
                                            (`steps`), with their mean and min as the scores
    both-orders:SPEC                        `bias.BothOrdersJudge` around a pairwise SPEC (tie on disagreement)
    ensemble:mean:SPEC+SPEC+...             mean / median of pointwise scores
    ensemble:median:SPEC+SPEC+...
    ensemble:vote:SPEC+SPEC+...             majority vote (ties abstain)
    ensemble:meta:SPEC+...+ARBITER          members' verdict when they agree, else the last SPEC decides
    ensemble:weighted:SPEC+SPEC+...         logistic weights fitted on human labels (judge-eval: on the train part
                                            of --test-split)

BACKEND is a local model directory (default: the embedded SmolLM2-135M-Instruct) or an OpenAI-compatible
server as `http://HOST:PORT/v1#MODEL` (the API key, if any, from $OPENAI_API_KEY). Backends named twice in
one call are loaded once.
"""

from __future__ import annotations

import importlib
from typing import Any

from alignpipe import AlignpipeError
from alignpipe.records import Candidate, Judgment, Prompt

LLM_KINDS = {"pairwise": "PairwiseLLMJudge", "pointwise": "PointwiseLLMJudge", "rubric": "RubricLLMJudge",
             "additive": "AdditiveLLMJudge"}
ENSEMBLES = ("mean", "median", "vote", "meta", "weighted")


class LengthJudge:
    """Baseline pointwise judge: the score is the response length in characters (negated for `shorter`)."""

    def __init__(self, prefer: str = "longer") -> None:
        if prefer not in ("longer", "shorter"):
            raise ValueError(f"prefer must be 'longer' or 'shorter', not {prefer!r}")
        self.name, self.sign = prefer, 1.0 if prefer == "longer" else -1.0

    def score(self, items: list[tuple[Prompt, Candidate]]) -> list[Judgment]:
        return [Judgment(prompt_id=p.id, candidate_ids=[c.id], judge=self.name,
                         scores={"length": self.sign * len(c.completion)}) for p, c in items]


def _optional(module: str, spec: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise AlignpipeError(f"judge {spec!r} not available: {module} cannot be imported ({exc})") from None


class JudgeRegistry:
    """Resolves judge specs; caches backends so that judges on one model share it."""

    def __init__(self, llm_options: dict[str, Any] | None = None, cache_dir: str | None = None) -> None:
        from alignpipe.evaluation.judgment_cache import JudgmentStore

        self._backends: dict[str, Any] = {}
        self._judges: dict[str, Any] = {}  # a spec named twice (alone and in an ensemble) is one judge
        # model-backed judges answer a repeated question from here (in memory; on disk with cache_dir)
        self.store = JudgmentStore(cache_dir)
        # e.g. {"brief": True, "max_new_tokens": 16} or {"verdict": "logprobs", "precision": "bf16"}: every LLM judge
        self.llm_options = llm_options or {}

    def backend(self, target: str, spec: str) -> Any:
        key = target or "embedded"
        if key not in self._backends:
            backends = _optional("alignpipe.synthesis.backends", spec)
            if target.startswith(("http://", "https://")):
                url, sep, model = target.partition("#")
                if not sep or not model:
                    raise AlignpipeError(f"judge {spec!r}: a server backend is written URL#MODEL, e.g. "
                                         "http://127.0.0.1:8000/v1#my-model")
                self._backends[key] = backends.OpenAIBackend(url, model)
            else:
                from alignpipe.models import resolve_model_path

                self._backends[key] = backends.TransformersBackend(resolve_model_path(target or None))
        return self._backends[key]

    def resolve(self, spec: str) -> Any:
        spec = spec.strip()
        if spec not in self._judges:
            judge = self._build(spec)
            if spec.partition(":")[0] in (*LLM_KINDS, "atomic", "reward-model"):
                from alignpipe.evaluation.judgment_cache import CachedJudge

                judge = CachedJudge(judge, self.store)
            self._judges[spec] = judge
        return self._judges[spec]

    def _build(self, spec: str) -> Any:
        kind, _, rest = spec.partition(":")
        if kind in ("longer", "shorter") and not rest:
            return LengthJudge(kind)
        if kind == "reward-model":
            if not rest:
                raise AlignpipeError("judge 'reward-model' needs a directory: reward-model:DIR")
            from alignpipe.evaluation.reward_model import RewardModelJudge

            return RewardModelJudge(rest)
        if kind in LLM_KINDS:
            module = _optional("alignpipe.evaluation.llm_judge", spec)
            cls = getattr(module, LLM_KINDS[kind], None)
            if cls is None:
                raise AlignpipeError(f"judge {spec!r} not available: llm_judge has no {LLM_KINDS[kind]}")
            return cls(self.backend(rest, spec), **self.llm_options)
        if kind == "atomic":
            if self.llm_options.get("verdict", "generate") != "generate":
                raise AlignpipeError(f"judge {spec!r}: the atomic judge has no logprobs verdict mode")
            atomic = _optional("alignpipe.evaluation.atomic", spec)
            return atomic.AtomicLLMJudge(self.backend(rest, spec), **self.llm_options)
        if kind == "both-orders":
            inner = self.resolve(rest)
            if not callable(getattr(inner, "compare", None)):
                raise AlignpipeError(f"judge {spec!r}: both-orders needs a pairwise judge, {inner.name} is pointwise")
            bias = _optional("alignpipe.evaluation.bias", spec)
            return bias.BothOrdersJudge(inner)
        if kind == "ensemble":
            return self._ensemble(rest, spec)
        raise AlignpipeError(f"unknown judge {spec!r}; known: longer, shorter, reward-model:DIR, "
                             f"{', '.join(LLM_KINDS)}, atomic[:BACKEND], both-orders:SPEC, ensemble:KIND:SPEC+SPEC")

    def _ensemble(self, rest: str, spec: str) -> Any:
        from alignpipe.evaluation import ensemble as ens

        how, _, members_spec = rest.partition(":")
        if how not in ENSEMBLES:
            raise AlignpipeError(f"judge {spec!r}: ensemble kind must be one of {', '.join(ENSEMBLES)}")
        members = [self.resolve(s) for s in members_spec.split("+") if s.strip()]
        if len(members) < 2:
            raise AlignpipeError(f"judge {spec!r}: an ensemble needs at least two members joined by '+'")
        if how in ("mean", "median"):
            pairwise = [m.name for m in members if ens.is_pairwise(m)]
            if pairwise:
                raise AlignpipeError(f"judge {spec!r}: {how} averages scores; {', '.join(pairwise)} is pairwise")
            return ens.MeanEnsemble(members, reduce=how)
        if how == "vote":
            return ens.VoteEnsemble(members)
        if how == "weighted":  # fitted on human labels before use (judge-eval: on the --test-split train part)
            return ens.WeightedEnsemble(members, name=f"weighted({'+'.join(m.name for m in members)})")
        return ens.MetaJudge(members[:-1], members[-1])


def resolve_judge(spec: str) -> Any:
    return JudgeRegistry().resolve(spec)


def resolve_judges(specs: list[str], llm_options: dict[str, Any] | None = None,
                   cache_dir: str | None = None) -> list[Any]:
    registry = JudgeRegistry(llm_options, cache_dir)
    return [registry.resolve(s) for s in specs]
