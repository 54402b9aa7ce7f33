"""A build recipe: the YAML of `alignpipe run self-instruct` / `evol-instruct`, told apart from a loop recipe by its
top-level `build:` key. Every section forbids unknown keys, so a typo fails at load time naming its key path
(`self-instruct.yaml: invalid recipe: filter.rouge_treshold: Extra inputs are not permitted`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from alignpipe import AlignpipeError
from alignpipe.config import Strict, _format_error
from alignpipe.recipe_io import apply_overrides, read_recipe_yaml
from alignpipe.synthesis.instruction_build.rouge_filter import DEFAULT_BLOCKLIST

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
OPERATIONS = ("constraints", "deepen", "concretize", "reasoning", "complicate_input", "breadth")


class GeneratorOptions(Strict):
    """Which generator serves the build: `transformers` (the recipe's `model` in this process; None = the
    embedded SmolLM2-135M-Instruct) or `openai` (an OpenAI-compatible server at `base_url`, e.g.
    http://127.0.0.1:8000/v1, serving `model` by name)."""

    backend: Literal["transformers", "openai"] = "transformers"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    batch_size: int = Field(32, ge=1)  # transformers: rows (prompts x samples) per forward batch
    concurrency: int = Field(8, ge=1)  # openai: requests in flight

    @model_validator(mode="after")
    def _server(self) -> GeneratorOptions:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs generator.base_url (e.g. http://127.0.0.1:8000/v1)")
        if self.backend == "transformers" and self.base_url:
            raise ValueError("generator.base_url is for backend 'openai'")
        return self


class Sampling(Strict):
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1)


class InstructionFilter(Strict):
    """Self-Instruct's filters (rouge_filter.py)."""

    rouge_threshold: float = Field(0.7, gt=0, le=1)  # kept only if ROUGE-L F with every pool instruction is below
    min_words: int = Field(3, ge=1)
    max_words: int = Field(150, ge=1)
    blocklist: list[str] = Field(default_factory=lambda: list(DEFAULT_BLOCKLIST))

    @model_validator(mode="after")
    def _range(self) -> InstructionFilter:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) is above max_words ({self.max_words})")
        return self


class Elimination(Strict):
    """Evol-Instruct's elimination rules on an evolved instruction and its response (evol_instruct.py)."""

    min_response_words: int = Field(3, ge=1)  # a shorter response fails (`short_response`)
    sorry_max_words: int = Field(80, ge=1)  # a response with "sorry" and fewer words than this fails


class BuildBase(Strict):
    name: str
    output_dir: str = "runs"
    model: str | None = None  # transformers: a local model directory (None: embedded); openai: the served name
    generator: GeneratorOptions = Field(default_factory=GeneratorOptions)
    seed: int = 0
    seed_tasks: str | None = None  # instruction file (Alpaca, ShareGPT, messages, ...); None: the built-in set
    responses: Sampling = Field(default_factory=lambda: Sampling(temperature=0.3, max_new_tokens=128))
    overwrite: bool = False  # replace the files of an earlier build of the same name (else: refuse)

    @model_validator(mode="after")
    def _model(self) -> BuildBase:
        if self.generator.backend == "openai" and not self.model:
            raise ValueError("backend 'openai' needs model: the name the server serves")
        if "/" in self.name or "\\" in self.name or self.name in ("", ".", ".."):
            raise ValueError(f"name {self.name!r}: a run name, not a path")
        if self.seed_tasks is not None and not Path(self.seed_tasks).expanduser().exists():
            raise ValueError(f"seed_tasks: {self.seed_tasks} does not exist")
        return self


class SelfInstructRecipe(BuildBase):
    """Self-Instruct (arXiv 2212.10560): see self_instruct.py."""

    build: Literal["self_instruct"] = "self_instruct"
    name: str = "self-instruct"
    num_instructions: int = Field(200, ge=1)  # stop once this many instructions passed the filters
    max_calls: int = Field(600, ge=1)  # ... or after this many instruction-generation prompts
    instructions_per_call: int = Field(8, ge=1)  # how many new instructions a prompt asks for
    calls_per_batch: int = Field(32, ge=1)  # prompts sent to the generator at once (at most)
    seed_examples: int = Field(6, ge=0)  # in-context examples per prompt from the seed tasks ...
    generated_examples: int = Field(2, ge=0)  # ... and from the instructions generated so far
    instructions: Sampling = Field(default_factory=lambda: Sampling(temperature=0.8, top_p=0.95,
                                                                     max_new_tokens=160))
    filter: InstructionFilter = Field(default_factory=InstructionFilter)

    @model_validator(mode="after")
    def _examples(self) -> SelfInstructRecipe:
        if self.seed_examples + self.generated_examples < 1:
            raise ValueError("seed_examples + generated_examples must be at least 1 (the prompt shows examples)")
        return self


class EvolInstructRecipe(BuildBase):
    """Evol-Instruct (arXiv 2304.12244): see evol_instruct.py."""

    build: Literal["evol_instruct"] = "evol_instruct"
    name: str = "evol-instruct"
    rounds: int = Field(4, ge=1)
    num_instructions: int | None = Field(None, ge=1)  # the first N seed instructions start the pool (None: all)
    max_calls: int | None = Field(None, ge=1)  # evolution prompts in all; a round is cut short to stay within
    operations: list[Literal["constraints", "deepen", "concretize", "reasoning", "complicate_input", "breadth"]] = \
        Field(default_factory=lambda: list(OPERATIONS))  # each instruction evolves by one, drawn uniformly
    include_seeds: bool = True  # the dataset also holds the starting instructions with their own responses
    evolution: Sampling = Field(default_factory=lambda: Sampling(temperature=0.7, max_new_tokens=96))
    elimination: Elimination = Field(default_factory=Elimination)

    @model_validator(mode="after")
    def _operations(self) -> EvolInstructRecipe:
        if not self.operations:
            raise ValueError("operations: at least one evolution operation is needed")
        return self


BuildRecipe = SelfInstructRecipe | EvolInstructRecipe
KINDS: dict[str, type[BuildBase]] = {"self_instruct": SelfInstructRecipe, "evol_instruct": EvolInstructRecipe}


def _resolve(recipe: str | Path) -> Path | None:
    """The recipe file (a path, or the name of a built-in recipe), or None when there is none."""
    path = Path(recipe)
    if path.is_file():
        return path
    builtin = RECIPES / f"{path.stem}.yaml"
    if path.suffix == "" and not path.exists() and builtin.is_file():
        return builtin
    return None


def build_recipe_path(recipe: str | Path | None) -> Path | None:
    """The file of `recipe` when it is a build recipe (top-level `build:` key), else None (the loop's recipe
    loader then reads it, and reports a missing or malformed file)."""
    if recipe is None:
        return None
    path = _resolve(recipe)
    if path is None or path.is_dir():
        return None
    return path if "build" in read_recipe_yaml(path) else None


def load_build_recipe(recipe: str | Path, overrides: dict[str, Any] | None = None) -> BuildRecipe:
    """A build recipe from YAML (a path or a built-in name) with `--set` overrides (dotted keys); errors name the
    file and the key path."""
    path = _resolve(recipe)
    if path is None:
        raise AlignpipeError(f"recipe file not found: {recipe}")
    data = read_recipe_yaml(path)
    apply_overrides(data, overrides)
    kind = data.get("build")
    if kind not in KINDS:
        raise AlignpipeError(f"{path}: invalid recipe: build: expected one of {', '.join(KINDS)}, got {kind!r}")
    try:
        return KINDS[kind].model_validate(data)
    except ValidationError as err:
        raise AlignpipeError(_format_error(err, str(path))) from None
