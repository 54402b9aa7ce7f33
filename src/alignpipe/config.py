"""A recipe: one pydantic model per pipeline stage, loaded from YAML.

Every model forbids unknown keys, so a typo fails at load time with its path
(e.g. `synthesis.temprature: Extra inputs are not permitted`), before any work starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from alignpipe import AlignpipeError
from alignpipe.config_tasks import (  # noqa: F401 - re-exported: the task section of a recipe
    GOLD_TASKS,
    ArithmeticTask,
    FileTask,
    Gsm8kTask,
    HumanEvalTask,
    InstructionTask,
    PreferenceTask,
    Strict,
)
from alignpipe.recipe_io import apply_overrides, read_recipe_yaml


class SourceSpec(Strict):
    """One source of candidates in a mixture: `k` candidates per prompt from it."""

    # policy: the current policy; teacher: another model (distillation); gold: the task's reference response
    # (GSM8K's worked solution, the arithmetic answer, HumanEval's canonical solution, a preference pair's chosen
    # response); offline: every response the dataset ships with for the prompt (preference tasks)
    source: Literal["policy", "teacher", "gold", "offline"]
    k: int = Field(1, ge=1)  # policy/teacher samples per prompt (gold and offline give what the data has)
    model: str | None = None  # teacher: a local model directory, or URL#MODEL of an OpenAI-compatible server
    temperature: float | None = Field(None, ge=0)  # this source's sampling temperature (None: synthesis's)

    @model_validator(mode="after")
    def _teacher_has_model(self) -> SourceSpec:
        if self.source == "teacher" and not self.model:
            raise ValueError("a teacher source needs `model` (a local model directory or URL#MODEL)")
        if self.source != "teacher" and self.model:
            raise ValueError(f"`model` is for teacher sources; a {self.source} source has none")
        return self


class TemperatureSchedule(Strict):
    """Exploration by temperature (survey section 4.3): per round, and/or spread across a prompt's samples."""

    rounds: list[float] | None = None  # temperature of round r; the last value repeats for later rounds
    per_sample: tuple[float, float] | None = None  # the k samples of a prompt spread evenly over [low, high]

    @field_validator("rounds")
    @classmethod
    def _nonneg(cls, values: list[float] | None) -> list[float] | None:
        if values is not None and (not values or any(v < 0 for v in values)):
            raise ValueError("rounds: a non-empty list of temperatures >= 0")
        return values

    @field_validator("per_sample")
    @classmethod
    def _range(cls, bounds: tuple[float, float] | None) -> tuple[float, float] | None:
        if bounds is not None and not 0 <= bounds[0] <= bounds[1]:
            raise ValueError(f"per_sample is [low, high] with 0 <= low <= high, got {list(bounds)}")
        return bounds


class SynthesisConfig(Strict):
    """Where a round's candidates come from (synthesis/sources.py).

    `source` policy: k samples of the current policy; teacher: k samples of `teacher` (distillation); self_play:
    SPIN (arXiv 2401.01335), the task's gold response plus k policy samples (judge with `provenance`, which
    prefers the gold one); gold: the task's gold responses alone (instruction tuning on a dataset's demonstrations);
    offline: the dataset's own responses; mixture: the sources listed in `mixture`."""

    source: Literal["policy", "teacher", "self_play", "gold", "offline", "mixture"] = "policy"
    # how policy samples are generated: transformers (in process, one shared prefill per prompt), openai (a
    # server at `server` that serves the current policy), vllm (in process on a GPU, the round's LoRA adapter
    # loaded as an adapter). `offline` is the older spelling of `source: offline`.
    backend: Literal["transformers", "openai", "vllm", "offline"] = "transformers"
    server: str | None = None  # backend openai: URL#MODEL of the server that serves the policy
    # backend openai with an adapter: push: each round's LoRA adapter is loaded into the server (vLLM's runtime
    # LoRA loading) and sampled from, so the samples are the trained policy's; none: sample the served model as is
    server_adapter: Literal["push", "none"] = "push"
    teacher: str | None = None  # source teacher: a local model directory, or URL#MODEL
    mixture: list[SourceSpec] | None = None
    api_key_env: str = "OPENAI_API_KEY"  # a server's API key is read from this variable
    prompts_per_round: int = Field(64, ge=1)
    samples_per_prompt: int = Field(8, ge=1)
    temperature: float = Field(1.0, ge=0)
    temperature_schedule: TemperatureSchedule | None = None
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(64, ge=1)
    # verbalized sampling (arXiv 2510.01171): ask for this many distinct answers in one response and parse them
    # into candidates, instead of sampling them one by one
    verbalized: int | None = Field(None, ge=2)
    # DAPO's dynamic sampling (arXiv 2503.14476): a prompt whose candidates all tie is replaced by a fresh prompt,
    # up to this many extra sampling passes per round (0: off)
    dynamic_sampling: int = Field(0, ge=0)
    # add the embedding spread (all-MiniLM-L6-v2, the `diversity` extra) to each round's diversity figures
    embedding_diversity: bool = False

    @model_validator(mode="after")
    def _sources_complete(self) -> SynthesisConfig:
        if self.backend == "offline":  # the older spelling
            self.source, self.backend = "offline", "transformers"
        if self.source == "teacher" and not self.teacher:
            raise ValueError("source 'teacher' needs synthesis.teacher (a local model directory or URL#MODEL)")
        if self.source == "mixture" and not self.mixture:
            raise ValueError("source 'mixture' needs synthesis.mixture, a list of {source, k}")
        if self.source != "mixture" and self.mixture:
            raise ValueError(f"synthesis.mixture is for source 'mixture' (source is {self.source!r})")
        if self.backend == "openai" and not self.server:
            raise ValueError("backend 'openai' needs synthesis.server (URL#MODEL of the server serving the policy)")
        if self.backend == "vllm":
            from alignpipe.synthesis.generators import check_backend_available

            reason = check_backend_available("vllm")
            if reason:
                raise ValueError(f"backend 'vllm': {reason}")
        for i, spec in enumerate(self.source_specs()):
            if spec.source == "teacher":
                _check_model_ref(spec.model or "", f"mixture.{i}.model" if self.mixture else "teacher")
        return self

    def source_specs(self) -> list[SourceSpec]:
        """The sources of a round as a list (a single source is a one-item mixture)."""
        k = self.samples_per_prompt
        if self.source == "mixture":
            return list(self.mixture or [])
        if self.source == "offline":
            return [SourceSpec(source="offline")]
        if self.source == "teacher":
            return [SourceSpec(source="teacher", k=k, model=self.teacher)]
        if self.source == "self_play":
            return [SourceSpec(source="gold"), SourceSpec(source="policy", k=k)]
        if self.source == "gold":
            return [SourceSpec(source="gold")]
        return [SourceSpec(source="policy", k=k)]

    def uses(self, source: str) -> bool:
        return any(s.source == source for s in self.source_specs())


def _check_model_ref(ref: str, what: str) -> None:
    """A model is a local directory or URL#MODEL; a directory that does not exist fails at load time."""
    if ref.startswith(("http://", "https://")):
        if "#" not in ref:
            raise ValueError(f"{what}: {ref!r}: a server is given as URL#MODEL")
        return
    if not Path(ref).expanduser().is_dir():
        hint = " (run `alignpipe run quickstart` first: it writes that model)" if \
            Path(ref).as_posix().endswith("quickstart/final_model") else ""
        raise ValueError(f"{what}: model directory {ref!r} does not exist{hint}")


def _check_judge_spec(spec: str, reward_model_pairs: str | None = None) -> str:
    from alignpipe.evaluation.judge_registry import validate_spec

    validate_spec(spec, reward_model_dirs_may_be_missing=reward_model_pairs is not None)
    return spec.strip()


class EvaluationConfig(Strict):
    """The judge of the loop: a spec string of the judge registry (the same that `judge-eval --judge` takes),
    e.g. `math_verifier`, `pairwise`, `additive:policy`, `reward-model:DIR`, `ensemble:vote:A+B+C`; and the
    options of the judges it builds."""

    # a `reward-model:DIR` whose DIR does not exist yet is trained there from these pairs before round 0
    # (declared before `judge`, whose check reads it)
    reward_model_pairs: str | None = None
    reward_model_limit: int | None = Field(None, ge=2)  # use only the first N of those pairs
    judge: str = "math_verifier"
    # the model of an LLM judge whose spec names none: policy (the current policy judging its own samples,
    # self-rewarding), reference (the frozen base), a local model directory, or an OpenAI-compatible server
    # as URL#MODEL
    model: str = "reference"
    api_key_env: str = "OPENAI_API_KEY"  # where a server judge's API key is read from
    # logprobs: one forward pass reads the probabilities of the allowed answers (never unparseable, ~10x
    # fewer tokens); generate: write an answer and parse it strictly, with re-asks; auto: logprobs on a local
    # model, generate on a server
    verdict: Literal["auto", "generate", "logprobs"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # of logprob verdicts (see optimization.precision)
    brief: bool = True  # generate mode: the verdict line only, no rationale
    max_new_tokens: int = Field(48, ge=1)  # generate mode
    # pairwise judges over k candidates: each compared pair asked in both orders (position bias becomes a
    # tie instead of a verdict), at most `max_comparisons` pairs per prompt (None: the plan's default),
    # aggregated to per-candidate scores
    both_orders: bool = True
    max_comparisons: int | None = Field(None, ge=1)
    aggregate: Literal["win_rate", "bradley_terry"] = "win_rate"
    cross_family: bool = False  # refuse a judge model of the policy's family (self-preference)
    # step-labels (Math-Shepherd): continuations per step prefix, and which label goes to `steps`
    rollouts: int = Field(8, ge=1)
    step_estimate: Literal["hard", "soft"] = "hard"

    @field_validator("judge")
    @classmethod
    def _valid_judge(cls, spec: str, info: ValidationInfo) -> str:
        return _check_judge_spec(spec, info.data.get("reward_model_pairs"))

    def step_options(self) -> dict[str, Any]:
        return {"rollouts": self.rollouts, "estimate": self.step_estimate}

    def llm_options(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "precision": self.precision, "brief": self.brief,
                "max_new_tokens": self.max_new_tokens}


class SelectionConfig(Strict):
    """Which of a round's built examples are trained on (survey section 4.2; instantiation/selection.py), within
    a per-round `budget` of examples (or of prompts, `unit: prompt`); kept examples keep their order.

    random: a seeded subset. score_margin: the judge's score gap; RS-DPO's threshold (arXiv 2402.10038) keeps
    a pair when sigmoid(gap / tau) > eta, `min_margin` a plain floor; then the largest gaps. implicit_margin:
    the DPO implicit reward gap under the round-start policy against the reference, `keep` highest (BeeS-style
    margin maximisation), lowest, or potential (judged gap not yet learnt). uncertainty: `measure`
    judge_disagreement (pairwise verdicts across both orders / ensemble members) or ensemble_variance
    (variance of an ensemble judge's margins), `keep` least (default) or most uncertain."""

    rule: Literal["random", "score_margin", "implicit_margin", "uncertainty"]
    budget: int | None = Field(None, ge=1)
    unit: Literal["example", "prompt"] = "example"
    min_margin: float | None = None  # score_margin
    eta: float | None = Field(None, gt=0, lt=1)  # score_margin
    tau: float = Field(1.0, gt=0)  # score_margin
    beta: float = Field(0.1, gt=0)  # implicit_margin
    keep: Literal["highest", "lowest", "potential", "least", "most"] | None = None
    measure: Literal["judge_disagreement", "ensemble_variance"] | None = None  # uncertainty

    @model_validator(mode="after")
    def _fits_rule(self) -> SelectionConfig:
        own = {"score_margin": {"min_margin", "eta"}, "uncertainty": {"measure"}}
        for rule, names in own.items():
            given = sorted(n for n in names if getattr(self, n) is not None)
            if given and self.rule != rule:
                raise ValueError(f"{', '.join(given)}: for rule {rule!r}, not {self.rule!r}")
        keeps = {"implicit_margin": ("highest", "lowest", "potential"), "uncertainty": ("least", "most")}
        if self.keep is not None and self.keep not in keeps.get(self.rule, ()):
            raise ValueError(f"keep {self.keep!r} is not a choice of rule {self.rule!r} "
                             f"({', '.join(keeps.get(self.rule, ())) or 'it has no keep'})")
        if self.rule == "uncertainty" and self.measure is None:
            raise ValueError("rule 'uncertainty' needs measure (judge_disagreement or ensemble_variance)")
        return self

    def params(self) -> dict[str, Any]:
        """The rule's keyword parameters for `selection.select` (inputs computed from the round are added)."""
        if self.rule == "random":
            return {"unit": self.unit}
        if self.rule == "score_margin":
            return {"unit": self.unit, "min_margin": self.min_margin, "eta": self.eta, "tau": self.tau}
        if self.rule == "implicit_margin":
            return {"unit": self.unit, "beta": self.beta, "keep": self.keep or "highest"}
        return {"unit": self.unit, "measure": self.measure,
                "keep": self.keep}


class InstantiationConfig(Strict):
    # sft: demonstrations, the candidates scoring >= label_threshold (instantiation/sft.py)
    kind: Literal["pair", "point", "group", "sft"] = "pair"
    # best_vs_worst: one pair per prompt; reward_gap: RS-DPO's every pair with sigmoid(gap / gap_tau) > gap_eta;
    # divpo (arXiv 2501.18101): the most diverse candidate scoring >= divpo_threshold is chosen, the least
    # diverse below it rejected (divpo_rho: the top / bottom rho fraction by score instead of a threshold)
    pairs: Literal["best_vs_worst", "reward_gap", "divpo"] = "best_vs_worst"
    gap_eta: float = Field(0.85, gt=0, lt=1)
    gap_tau: float = Field(1.0, gt=0)
    divpo_threshold: float = 0.5
    divpo_rho: float | None = Field(None, gt=0, le=0.5)
    # ngram: 1 - mean Jaccard of a response's bigrams to its siblings'; embedding: mean cosine distance of
    # all-MiniLM-L6-v2 embeddings (the `diversity` extra); word_frequency: rarity of its words
    divpo_diversity: Literal["ngram", "embedding", "word_frequency"] = "ngram"
    selection: SelectionConfig | None = None
    min_margin: float = Field(0.0, ge=0)
    drop_uniform_groups: bool = True  # a group whose scores all tie carries no signal
    label_threshold: float = 0.5  # point: desirable when score >= threshold (the binarization rule); sft: kept
    # the judgment dimension that is the reward (ranks pairs, labels points, group rewards), e.g. "rule:correct";
    # None: the mean of all of them. Every dimension is also kept on the examples (`dims`) for input providers.
    score: str | None = None

    @model_validator(mode="after")
    def _selection_fits_kind(self) -> InstantiationConfig:
        rule = self.selection.rule if self.selection else None
        if rule in ("implicit_margin", "uncertainty") and self.kind != "pair":
            raise ValueError(f"selection rule {rule!r} ranks pairs; instantiation.kind is {self.kind!r}")
        if rule == "score_margin" and self.kind == "point":
            raise ValueError("selection rule 'score_margin' needs pairs or groups (points have no margin)")
        return self


class ObjectiveTerm(Strict):
    """One term of the weighted objective list; every other key is a hyperparameter of the loss."""

    model_config = ConfigDict(extra="allow")
    name: str
    weight: float = 1.0

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class AdapterConfig(Strict):
    """Parameter-efficient fine-tuning with peft; `adapter: null` in a recipe means full fine-tuning."""

    method: Literal["lora", "ia3", "prefix_tuning"] = "lora"
    r: int = Field(16, ge=1)  # lora
    alpha: int = Field(32, ge=1)  # lora
    dropout: float = Field(0.0, ge=0, lt=1)  # lora
    target_modules: list[str] | str = "all-linear"  # lora, ia3
    num_virtual_tokens: int = Field(16, ge=1)  # prefix_tuning


class OptimizationConfig(Strict):
    objectives: list[ObjectiveTerm] = Field(default_factory=lambda: [ObjectiveTerm(name="dpo")])
    adapter: AdapterConfig | None = Field(default_factory=AdapterConfig)  # null = full fine-tuning
    # "base": the frozen initial model (LoRA-disabled base, or a frozen copy under full fine-tuning);
    # "round_start": the policy at the start of each round (iterative DPO's ref = M_t; sDPO's staged ref);
    # "moving": TR-DPO (arXiv 2404.09656), ref <- a*theta + (1-a)*ref every `ref_sync_every` steps,
    # starting from the policy at the start of the round; computed live per batch, not precomputed.
    reference: Literal["base", "round_start", "moving"] = "base"
    ref_sync_alpha: float = Field(0.6, gt=0, le=1)
    ref_sync_every: int = Field(512, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)  # pairs or groups per optimizer step
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(512, ge=8)
    logprob_chunk: int = Field(1024, ge=1)  # positions per LM-head chunk
    # one decoder pass per pair or group on a packed row (shared prompt once, no padding between its rows;
    # optimization/packing.py): same values and gradients, fewer positions. false: one padded row per completion
    prefix_sharing: bool = True
    # batches of examples of similar length (windows of 16 batches sorted by length, then shuffled): less padding
    length_bucketing: bool = True
    # true: keep only each decoder layer's input in the forward pass and recompute the rest in backward: activation
    # memory falls from ~50 KB to ~2 KB per token and layer (a batch of 16 x 300 tokens on the embedded model:
    # 6.5 GB -> 2.2 GB in bf16) for one more forward pass. selective: the same, but some matmul outputs are kept,
    # not recomputed (docs/performance.md): under full fine-tuning the MLP's gate and up projections (half the
    # layer's multiply-adds; ~12 KB more per token and layer, 1.1x faster steps); under an adapter the frozen base
    # projections' outputs (~20 KB per token and layer in fp32), up to `checkpoint_keep_mb`. false: nothing
    # recomputed. Not for prefix/prompt tuning (peft's virtual tokens).
    gradient_checkpointing: bool | Literal["selective"] = "selective"
    # under an adapter with selective checkpointing: the most memory (MB) of kept projection outputs alive at once;
    # past it the later layers recompute theirs. 0: keep none (as true)
    checkpoint_keep_mb: float = Field(512, ge=0)
    temperature: float = Field(1.0, gt=0)  # divide logits by the sampling temperature (on-policy RL)
    # bf16: autocast matmuls (log-probs and losses stay fp32); auto: bf16 only where the CPU/GPU has it natively
    # (AVX512-BF16, AMX, bf16 GPUs), else fp32: emulated bf16 on an AVX2-only CPU is ~30x slower
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # implicit-reward accuracy/margin and KL to the reference on the round's examples before and after its
    # updates (two no-grad passes; optimization/round_signal.py), for the round's diagnostics and the report
    measure_signal: bool = True
    # options of input providers (optimization/providers/), by provider name, e.g. {value_head: {...}}
    inputs: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("inputs")
    @classmethod
    def _known_providers(cls, inputs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Validate each provider's options with its `Options` model. A ValidationError raised here is merged
        into the recipe's with its location nested under this field: `optimization.inputs.<provider>.<key>`."""
        from alignpipe.optimization.providers import validate_options

        validate_options(inputs)
        return inputs

    @field_validator("objectives")
    @classmethod
    def _known_objectives(cls, terms: list[ObjectiveTerm]) -> list[ObjectiveTerm]:
        from alignpipe.optimization.objectives import OBJECTIVES

        if not terms:
            raise ValueError("at least one objective is needed")
        for term in terms:
            if term.name not in OBJECTIVES:
                raise ValueError(f"unknown objective {term.name!r}; known: {', '.join(sorted(OBJECTIVES))}")
            spec = OBJECTIVES[term.name]
            unknown = set(term.params) - set(spec.defaults)
            if unknown:
                raise ValueError(
                    f"objective {term.name!r} has no parameter {sorted(unknown)}; "
                    f"it takes {sorted(spec.defaults) or 'none'}"
                )
            for key, value in term.params.items():  # `beta: high` fails here, not a minute into training
                default = spec.defaults[key]
                numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
                if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise ValueError(f"objective {term.name!r}: {key} must be a number, got {value!r}")
                if numeric and key in NON_NEGATIVE_PARAMS and (value < 0 or value != value):
                    raise ValueError(f"objective {term.name!r}: {key} must be >= 0, got {value!r}")
                if isinstance(default, bool) and not isinstance(value, bool):
                    raise ValueError(f"objective {term.name!r}: {key} must be true or false, got {value!r}")
        return terms


# objective hyperparameters that are scales, weights, coefficients, clips or counts: a negative value is a typo
# that would otherwise train (e.g. `beta: -1` flips DPO's preference). `alpha` is not here: R-DPO's length term
# may take either sign.
NON_NEGATIVE_PARAMS = frozenset({
    "beta", "tau", "epsilon", "eps", "eps_low", "eps_high", "label_smoothing", "gamma", "gamma_beta_ratio",
    "delta", "lam", "center_coef", "vf_coef", "value_clip", "reward_clip", "score_clip", "sinkhorn_iters",
    "sinkhorn_tol", "desirable_weight", "undesirable_weight", "sft_weight", "rank_weight", "lagrange_lambda",
    "margin_scale", "length_penalty"})


class HeldoutEval(Strict):
    n: int = Field(240, ge=1)
    # tasks without a gold answer (chat): the final policy's greedy answers against the round-0 policy's,
    # judged by this spec (a judge that did not train the policy), both orders, ties half. None: the rubric
    # judge on the frozen base. Tasks with a verifier report greedy accuracy instead.
    judge: str | None = None

    @field_validator("judge")
    @classmethod
    def _valid_judge(cls, spec: str | None) -> str | None:
        return None if spec is None else _check_judge_spec(spec)
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(64, ge=1)
    # protocols run on the round-0 and the final policy whatever the task (diagnostics/protocols.py): ifeval
    # (verifiable constraints), safety (harmful requests from safety_path judged by safety_judge, 1 = refused),
    # utility (the judged win rate against round 0, with `judge`)
    protocols: list[Literal["ifeval", "safety", "utility"]] = []
    protocol_max_new_tokens: int = Field(256, ge=1)
    safety_path: str = "../shared/data/hh-rlhf-harmless/dev.jsonl"
    safety_n: int = Field(50, ge=1)
    safety_judge: str = "refusal"

    @field_validator("safety_judge")
    @classmethod
    def _valid_safety_judge(cls, spec: str) -> str:
        return _check_judge_spec(spec)


class Recipe(Strict):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a folder under output_dir, never a path
    model: str | None = None  # HF model dir; None = the embedded SmolLM2-135M-Instruct
    # `model` may be a previous run's final_model (a peft adapter): merge it into its base (the merged model is
    # the policy and the reference: SFT then DPO), or continue training that adapter (its base stays the
    # reference of reference-based objectives; needs `optimization.adapter`, whose settings the saved one overrides)
    model_adapter: Literal["merge", "continue"] = "merge"
    seed: int = 0
    rounds: int = Field(1, ge=1)
    output_dir: str = "runs"
    task: ArithmeticTask | Gsm8kTask | FileTask | PreferenceTask | HumanEvalTask | InstructionTask = Field(
        default_factory=ArithmeticTask, discriminator="kind")
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    instantiation: InstantiationConfig = Field(default_factory=InstantiationConfig)
    optimization: OptimizationConfig = Field(default_factory=OptimizationConfig)
    heldout: HeldoutEval = Field(default_factory=HeldoutEval)

    @field_validator("name", mode="before")
    @classmethod
    def _name_is_no_path(cls, name: Any) -> Any:
        """`name: ../x` or `/tmp/x` would put the run outside output_dir: say so, not just 'should match pattern'."""
        if isinstance(name, str) and ("/" in name or "\\" in name or name.startswith(".")):
            raise ValueError(f"{name!r} is a path; a run name is one folder name under output_dir (letters, digits, "
                             "'.', '_' and '-', not starting with '.')")
        return name

    @model_validator(mode="after")
    def _offline_needs_preferences(self) -> Recipe:
        offline = self.synthesis.uses("offline") or self.evaluation.judge == "human_label"
        if offline and self.task.kind != "preferences":
            raise ValueError("synthesis.source 'offline' and evaluation.judge 'human_label' need task.kind "
                             "'preferences' (responses and labels come with the data)")
        if self.synthesis.uses("gold") and self.task.kind not in GOLD_TASKS:
            raise ValueError(f"synthesis.source: a self_play/gold source needs gold responses, which task.kind "
                             f"{self.task.kind!r} does not have (tasks with them: {', '.join(GOLD_TASKS)})")
        return self

    @model_validator(mode="after")
    def _objectives_match_instances(self) -> Recipe:
        from alignpipe.optimization.objectives import OBJECTIVES
        from alignpipe.optimization.providers import check_options, provided

        kind = self.instantiation.kind
        for term in self.optimization.objectives:
            spec = OBJECTIVES[term.name]
            if kind not in spec.instances:
                raise ValueError(
                    f"objective {term.name!r} trains on {'/'.join(spec.instances)} examples, "
                    f"but instantiation.kind is {kind!r}"
                )
            missing = [name for name in spec.inputs if name not in provided(kind)]
            if missing:
                raise ValueError(
                    f"objective {term.name!r} needs {', '.join(missing)}, which {kind} examples built by this "
                    f"pipeline do not carry"
                )
        # options an objective cannot do without (MODPO's margin dimensions): before any sampling or judging
        wanted = {name for term in self.optimization.objectives for name in OBJECTIVES[term.name].inputs}
        check_options(self.optimization.inputs, wanted, kind)
        return self

    def fingerprint(self, *sections: str) -> str:
        """A hash of the named sections (all when none): a stage whose inputs did not change is skipped."""
        data = self.model_dump(mode="json")
        if sections:
            data = {k: data[k] for k in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _format_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{source}: invalid recipe: " + "; ".join(parts)


def load_recipe(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Load a recipe from YAML (None = the built-in quickstart); errors name the file and the key path."""
    if path is None:
        path = Path(__file__).parent / "recipes" / "quickstart.yaml"
    path = Path(path)
    if not path.is_file():
        builtin = Path(__file__).parent / "recipes" / f"{path.stem}.yaml"
        if path.suffix == "" and builtin.is_file():
            path = builtin
        elif not path.exists():
            raise AlignpipeError(f"recipe file not found: {path}")
    data = read_recipe_yaml(path)
    apply_overrides(data, overrides)
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise AlignpipeError(_format_error(err, str(path))) from None
