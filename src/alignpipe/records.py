"""The data model: plain dataclasses that round-trip to Parquet, one file per stage.

Field names follow TRL's dataset conventions where one exists (`prompt`, `completion`,
`chosen`, `rejected`), so data moves between the two without glue.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from alignpipe.killpoints import killpoint, where


@dataclass
class Prompt:
    id: str
    prompt: str
    task: str = "chat"
    reference: str | None = None  # gold answer, unit tests or rubric
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Candidate:
    prompt_id: str
    id: str
    completion: str
    source: dict[str, Any] = field(default_factory=dict)  # model, round, sampling params
    logprob: float | None = None
    num_tokens: int | None = None
    truncated: bool = False  # generation hit max_new_tokens before EOS


@dataclass
class Judgment:
    prompt_id: str
    candidate_ids: list[str]
    judge: str
    scores: dict[str, float] = field(default_factory=dict)
    preference: str | None = None  # pairwise: "first" / "second" / "tie"
    steps: list[float] | None = None
    rationale: str = ""
    raw: str = ""
    status: str = "ok"  # ok / invalid / error
    reason: str = ""


@dataclass
class PointExample:
    prompt: str
    completion: str
    score: float
    label: bool  # desirable (KTO/BCO); set by the instantiation's binarization rule
    weight: float = 1.0
    prompt_id: str = ""
    truncated: bool = False
    dims: dict[str, float] = field(default_factory=dict)  # every score dimension of the judgment


@dataclass
class PairExample:
    prompt: str
    chosen: str
    rejected: str
    margin: float
    weight: float = 1.0
    prompt_id: str = ""
    chosen_truncated: bool = False  # no EOS was generated: none is appended in training
    rejected_truncated: bool = False
    chosen_dims: dict[str, float] = field(default_factory=dict)  # every score dimension of the judgments
    rejected_dims: dict[str, float] = field(default_factory=dict)
    # SELM: a sample of the round-start policy for the prompt (instantiation.best_vs_worst_pairs)
    sampled: str | None = None
    sampled_truncated: bool = False


@dataclass
class GroupExample:
    prompt: str
    completions: list[str]
    scores: list[float]
    prompt_id: str = ""
    truncated: list[bool] = field(default_factory=list)
    dims: list[dict[str, float]] = field(default_factory=list)  # per completion: every score dimension
    baseline_score: float | None = None  # ReMax: the judged score of the policy's greedy decode


@dataclass
class SftExample:
    """A demonstration (instruction tuning): a conversation whose assistant turns are all trained on, the last
    one being the round's candidate (a gold, teacher or verified policy response)."""

    messages: list[dict[str, str]]  # {"role": system|user|assistant, "content": ...}
    prompt_id: str = ""
    score: float = 0.0
    weight: float = 1.0
    truncated: bool = False  # the last turn hit max_new_tokens: no EOS is trained after it


R = TypeVar("R")

# Nested dicts (meta, source, scores) are stored as JSON text: their keys vary from row to row,
# which a fixed Arrow struct cannot hold.
_JSON_FIELDS = {"meta", "source", "scores", "dims", "chosen_dims", "rejected_dims", "messages"}


def to_rows(records: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        row = asdict(r)
        for k in _JSON_FIELDS & row.keys():
            row[k] = json.dumps(row[k], sort_keys=True)
        rows.append(row)
    return rows


def write_records(path: str | Path, records: list[Any], cls: type | None = None) -> None:
    """Write records atomically: a killed write leaves the old file (or none), never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = to_rows(records)
    if rows:
        table = pa.Table.from_pylist(rows)
    else:  # an empty stage output still needs its columns
        names = [f.name for f in fields(cls)] if cls else []
        table = pa.table({n: pa.array([], pa.null()) for n in names})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    killpoint(f"write:{where(path)}")
    os.replace(tmp, path)


def remove_temporaries(directory: str | Path) -> int:
    """Delete the temporary files a killed process left under `directory` (`.NAME.tmp-PID` of the writers
    above, `.NAME.tmp` of a checkpoint save); returns how many. Call it only when no other process writes
    there."""
    import shutil

    removed = 0
    for tmp in sorted(Path(directory).rglob(".*.tmp*"), key=lambda p: len(p.parts)):
        if tmp.exists() and re.fullmatch(r"\..+\.tmp(-\d+)?", tmp.name):
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
            removed += 1
    return removed


def read_records(path: str | Path, cls: type[R]) -> list[R]:
    rows = pq.read_table(path).to_pylist()
    names = {f.name for f in fields(cls)}
    out = []
    for row in rows:
        row = {k: v for k, v in row.items() if k in names}
        for k in _JSON_FIELDS & row.keys():
            if isinstance(row[k], str):
                row[k] = json.loads(row[k])
        out.append(cls(**row))
    return out


def json_safe(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (strict JSON has no NaN), keys as text, tuples as
    lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def write_text_atomic(path: str | Path, text: str, durable: bool = False) -> Path:
    """Write `text` to a temporary name and rename it over `path`: a kill leaves the old file or the new one,
    never half of one. `durable`: also fsync the file and its directory (labels a person typed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    killpoint(f"write:{where(path)}")
    os.replace(tmp, path)
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:  # the rename itself is durable only once the directory is synced
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def write_json(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
