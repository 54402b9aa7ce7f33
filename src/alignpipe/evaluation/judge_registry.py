"""Judges by name: the one registry of `alignpipe run` (`evaluation.judge`, `heldout.judge`) and of
`alignpipe judge-eval --judge SPEC`; the same spec builds the same judge in both.

    math_verifier | code_verifier           model-free verifiers (`verifiers.py`): the final answer against
    rule_verifier | human_label             the gold one, HumanEval tests in the sandbox, a prompt's rules,
                                            a dataset's chosen/rejected label
    longer | shorter                        baselines: prefer the longer / shorter response (pointwise)
    accept                                  every response kept as it is (score 1): instruction tuning on
                                            trusted demonstrations (gold or teacher responses)
    refusal                                 `refusal.RefusalJudge`: 1 when the response declines (phrases)
    reward-model:DIR                        a local sequence classifier (`RewardModelJudge`)
    pairwise[:BACKEND]                      LLM judges from `evaluation.llm_judge`: pairwise A/B/tie,
    pointwise[:BACKEND]                     1-10 score, Prometheus rubric, additive 0-5
    rubric[:BACKEND]
    additive[:BACKEND]
    atomic[:BACKEND]                        `atomic.AtomicLLMJudge`: a 1-10 score per sentence, in context
                                            (`steps`), with their mean and min as the scores
    step-labels[:BACKEND]                   `step_labels.StepLabeler` (Math-Shepherd, arXiv 2312.08935): BACKEND
                                            continues each step prefix; per-step labels in `steps`, scores
                                            `correct` (the outcome) and `min_step`
    both-orders:SPEC                        `bias.BothOrdersJudge` around a pairwise SPEC (tie on disagreement)
    ensemble:mean:SPEC+SPEC+...             mean / median of pointwise scores
    ensemble:median:SPEC+SPEC+...
    ensemble:vote:SPEC+SPEC+...             majority vote (ties abstain)
    ensemble:meta:SPEC+...+ARBITER          members' verdict when they agree, else the last SPEC decides
    ensemble:weighted:SPEC+SPEC+...         logistic weights fitted on human labels (judge-eval: on the train part
                                            of --test-split)

BACKEND is a local model directory, an OpenAI-compatible server as `http://HOST:PORT/v1#MODEL` (the API key,
if any, from $OPENAI_API_KEY or the variable named by `api_key_env`), or, inside `alignpipe run`, `policy`
(the current policy judging its own samples: self-rewarding) or `reference` (the frozen base). A spec without
one uses the registry's default model (judge-eval: the embedded SmolLM2-135M-Instruct; a recipe:
`evaluation.model`). Backends named twice are loaded once.

`validate_spec` checks a spec's grammar (and that reward-model directories exist) without loading anything:
a recipe's judge is checked when the recipe loads, before any model is.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignpipe import AlignpipeError
from alignpipe.records import Candidate, Judgment, Prompt

LLM_KINDS = {"pairwise": "PairwiseLLMJudge", "pointwise": "PointwiseLLMJudge", "rubric": "RubricLLMJudge",
             "additive": "AdditiveLLMJudge"}
ENSEMBLES = ("mean", "median", "vote", "meta", "weighted")
LIVE_MODELS = ("policy", "reference")  # bound by `alignpipe run`; their judges change as the policy trains
KNOWN = ("math_verifier, code_verifier, rule_verifier, human_label, longer, shorter, accept, refusal, reward-model:DIR, "
         "pairwise|pointwise|rubric|additive|atomic|step-labels[:MODEL], both-orders:SPEC, ensemble:KIND:SPEC+SPEC")


def validate_spec(spec: str, reward_model_dirs_may_be_missing: bool = False) -> None:
    """Raise ValueError naming what is wrong with `spec`, without building anything."""
    from alignpipe.evaluation.verifiers import VERIFIERS

    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    if not spec:
        raise ValueError("empty judge spec")
    if spec in VERIFIERS or spec in ("accept", "refusal") or (kind in ("longer", "shorter") and not rest):
        return
    if kind == "reward-model":
        if not rest:
            raise ValueError("judge 'reward-model' needs a directory: reward-model:DIR")
        if not reward_model_dirs_may_be_missing and not Path(rest).is_dir():
            raise ValueError(f"judge {spec!r}: reward-model directory not found: {rest}")
        return
    if kind in (*LLM_KINDS, "atomic", "step-labels"):
        if rest.startswith(("http://", "https://")) and "#" not in rest:
            raise ValueError(f"judge {spec!r}: a server model is written URL#MODEL, e.g. http://127.0.0.1:8000/v1#m")
        return
    if kind == "both-orders":
        inner = rest.partition(":")[0]
        if inner not in ("pairwise", "ensemble", "both-orders"):
            raise ValueError(f"judge {spec!r}: both-orders needs a pairwise judge, {inner or 'nothing'} is not one")
        validate_spec(rest, reward_model_dirs_may_be_missing)
        return
    if kind == "ensemble":
        how, _, members = rest.partition(":")
        if how not in ENSEMBLES:
            raise ValueError(f"judge {spec!r}: ensemble kind must be one of {', '.join(ENSEMBLES)}")
        parts = [m for m in members.split("+") if m.strip()]
        if len(parts) < 2:
            raise ValueError(f"judge {spec!r}: an ensemble needs at least two members joined by '+'")
        for member in parts:
            validate_spec(member, reward_model_dirs_may_be_missing)
        return
    raise ValueError(f"unknown judge {spec!r}; known: {KNOWN}")


class LengthJudge:
    """Baseline pointwise judge: the score is the response length in characters (negated for `shorter`)."""

    def __init__(self, prefer: str = "longer") -> None:
        if prefer not in ("longer", "shorter"):
            raise ValueError(f"prefer must be 'longer' or 'shorter', not {prefer!r}")
        self.name, self.sign = prefer, 1.0 if prefer == "longer" else -1.0

    def score(self, items: list[tuple[Prompt, Candidate]]) -> list[Judgment]:
        return [Judgment(prompt_id=p.id, candidate_ids=[c.id], judge=self.name,
                         scores={"length": self.sign * len(c.completion)}) for p, c in items]


class AcceptJudge:
    """No judging: every response is kept with score 1 (`accepted`), for demonstrations that are trusted as they
    are (a dataset's gold responses, a teacher's). A response that could not be produced (a failed server
    sample, marked in its source) is an error, never a demonstration."""

    name = "accept"

    def score(self, items: list[tuple[Prompt, Candidate]]) -> list[Judgment]:
        out = []
        for p, c in items:
            failed = c.source.get("error")
            out.append(Judgment(prompt_id=p.id, candidate_ids=[c.id], judge=self.name,
                                scores={} if failed else {"accepted": 1.0}, status="error" if failed else "ok",
                                reason=str(failed or "")))
        return out


def _optional(module: str, spec: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise AlignpipeError(f"judge {spec!r} not available: {module} cannot be imported ({exc})") from None


class JudgeRegistry:
    """Resolves judge specs; caches backends so that judges on one model share it.

    `llm_options` go to every LLM judge (e.g. {"brief": True, "max_new_tokens": 48}; `verdict: auto` is
    `logprobs` on a local model and `generate` on a server). `models` binds the live model names (`policy`,
    `reference`) to functions that make their backend; `default_model` is the model of a spec that names
    none; with `cross_family_with` (the policy's name) a judge model of the policy's family is refused."""

    def __init__(self, llm_options: dict[str, Any] | None = None, cache_dir: str | None = None, *,
                 models: dict[str, Callable[[], Any]] | None = None, default_model: str = "",
                 api_key_env: str = "OPENAI_API_KEY", cross_family_with: str | None = None,
                 step_options: dict[str, Any] | None = None) -> None:
        from alignpipe.evaluation.judgment_cache import JudgmentStore

        self._backends: dict[str, Any] = {}
        self._judges: dict[str, Any] = {}  # a spec named twice (alone and in an ensemble) is one judge
        # model-backed judges answer a repeated question from here (in memory; on disk with cache_dir)
        self.store = JudgmentStore(cache_dir)
        self.llm_options = dict(llm_options or {})
        self.models = models or {}
        self.default_model = default_model
        self.api_key_env = api_key_env
        self.cross_family_with = cross_family_with
        self.step_options = dict(step_options or {})  # StepLabeler's rollouts, estimate, ...

    def new_store(self, cache_dir: str | Path | None) -> None:
        """Forget the judges (not the backends) and remember judgments in `cache_dir` from now on: the loop
        calls this every round, so a policy-backed judge never answers from an earlier round's policy, and a
        rerun of a round asks again only what was not judged `ok`."""
        from alignpipe.evaluation.judgment_cache import JudgmentStore

        self._judges.clear()
        self.store = JudgmentStore(cache_dir)

    def backend(self, target: str, spec: str) -> Any:
        target = target or self.default_model
        key = target or "embedded"
        if key not in self._backends:
            backends = _optional("alignpipe.synthesis.backends", spec)
            if target in LIVE_MODELS:
                if target not in self.models:
                    raise AlignpipeError(f"judge {spec!r}: the model {target!r} exists only inside `alignpipe run` "
                                         "(the policy being trained); give a model directory or server URL")
                self._backends[key] = self.models[target]()
            elif target.startswith(("http://", "https://")):
                url, sep, model = target.partition("#")
                if not sep or not model:
                    raise AlignpipeError(f"judge {spec!r}: a server backend is written URL#MODEL, e.g. "
                                         "http://127.0.0.1:8000/v1#my-model")
                self._backends[key] = backends.OpenAIBackend(url, model, api_key_env=self.api_key_env)
            else:
                from alignpipe.models import resolve_model_path

                self._backends[key] = backends.TransformersBackend(resolve_model_path(target or None))
            if self.cross_family_with is not None:
                from alignpipe.evaluation.bias import check_cross_family

                check_cross_family(self._backends[key].name, self.cross_family_with)
        return self._backends[key]

    def resolve(self, spec: str) -> Any:
        spec = spec.strip()
        if spec not in self._judges:
            judge = self._build(spec)
            if spec.partition(":")[0] in (*LLM_KINDS, "atomic", "reward-model", "step-labels"):
                from alignpipe.evaluation.judgment_cache import CachedJudge

                judge = CachedJudge(judge, self.store)
            self._judges[spec] = judge
        return self._judges[spec]

    def _llm_options(self, backend: Any, supports_logprobs: bool) -> dict[str, Any]:
        """`verdict: auto` resolved for this backend: logprobs where it can read next-token probabilities."""
        options = dict(self.llm_options)
        if options.get("verdict") == "auto":
            native = supports_logprobs and callable(getattr(backend, "choice_logprobs", None))
            options["verdict"] = "logprobs" if native else "generate"
        if options.get("verdict", "generate") == "generate":
            options.pop("precision", None)  # only logprob verdicts run their own forward pass
        return options

    def _build(self, spec: str) -> Any:
        from alignpipe.evaluation.verifiers import verifier

        kind, _, rest = spec.partition(":")
        found = verifier(spec)
        if found is not None:
            return found
        if kind in ("longer", "shorter") and not rest:
            return LengthJudge(kind)
        if spec == "accept":
            return AcceptJudge()
        if spec == "refusal":
            from alignpipe.evaluation.refusal import RefusalJudge

            return RefusalJudge()
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
            backend = self.backend(rest, spec)
            return cls(backend, **self._llm_options(backend, cls.logprob_verdicts))
        if kind == "atomic":
            backend = self.backend(rest, spec)
            options = self._llm_options(backend, supports_logprobs=False)
            if options.get("verdict", "generate") != "generate":
                raise AlignpipeError(f"judge {spec!r}: the atomic judge has no logprobs verdict mode")
            if options.get("hardened"):
                raise AlignpipeError(f"judge {spec!r}: the atomic judge has no hardened prompts")
            atomic = _optional("alignpipe.evaluation.atomic", spec)
            return atomic.AtomicLLMJudge(backend, **options)
        if kind == "step-labels":
            steps = _optional("alignpipe.evaluation.step_labels", spec)
            return steps.StepLabeler(self.backend(rest, spec), **self.step_options)
        if kind == "both-orders":
            inner = self.resolve(rest)
            if not callable(getattr(inner, "compare", None)):
                raise AlignpipeError(f"judge {spec!r}: both-orders needs a pairwise judge, {inner.name} is pointwise")
            bias = _optional("alignpipe.evaluation.bias", spec)
            return bias.BothOrdersJudge(inner)
        if kind == "ensemble":
            return self._ensemble(rest, spec)
        raise AlignpipeError(f"unknown judge {spec!r}; known: {KNOWN}")

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
