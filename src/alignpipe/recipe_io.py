"""A recipe and its files: reading a recipe YAML strictly, and checking that a recipe may resume the run
directory it names.

Reading: the file must be UTF-8 (UTF-16 is named as such), a non-empty YAML mapping without a key given twice
(PyYAML would silently keep the last one); errors name the file and the line.

Resuming: every stage of a round is stamped with a fingerprint of the recipe sections in `ROUND_SECTIONS`.
A recipe that differs in those sections from the one that made a run's finished rounds would redo them and
overwrite their files, and would answer some judgments from the round's judge cache made under the old recipe.
So that is an error naming the changed keys, before anything is read or written. `rounds` (a run extended by
more rounds) and `heldout` (the held-out evaluation, recomputed under its own fingerprint) may change.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from alignpipe import AlignpipeError

if TYPE_CHECKING:
    from alignpipe.config import Recipe

# the sections a round's fingerprint covers (loop.run stamps every round stage with their hash)
ROUND_SECTIONS = ("model", "model_adapter", "seed", "task", "synthesis", "evaluation", "instantiation", "optimization")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with a key given twice."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue  # complex keys and `<<` merges: left to PyYAML
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_recipe_yaml(path: Path) -> dict[str, Any]:
    """The mapping of a recipe file; a one-line error naming the file (and the line) otherwise."""
    if path.is_dir():
        raise AlignpipeError(f"{path}: a directory, not a recipe file")
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise AlignpipeError(f"{path}: not UTF-8 text (UTF-16, by its byte-order mark); save the recipe as UTF-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AlignpipeError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                             f"save the recipe as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise AlignpipeError(f"{path}: {where}not valid YAML ({problem})") from None
    if data is None:  # an empty file would otherwise run every default: the quickstart on the embedded model
        raise AlignpipeError(f"{path}: empty recipe (a recipe is a YAML mapping, e.g. `name: my-run`)")
    if not isinstance(data, dict):
        raise AlignpipeError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
    return data


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            _flatten(sub, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value
    return out


def _shown(value: Any) -> str:
    text = "(absent)" if value is _ABSENT else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


_ABSENT = object()


def recipe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every key of ROUND_SECTIONS whose value differs between two dumped recipes."""
    flat_old = _flatten({k: old.get(k) for k in ROUND_SECTIONS}, "", {})
    flat_new = _flatten({k: new.get(k) for k in ROUND_SECTIONS}, "", {})
    return [f"{key}: {_shown(flat_old.get(key, _ABSENT))} -> {_shown(flat_new.get(key, _ABSENT))}"
            for key in sorted(flat_old.keys() | flat_new.keys())
            if flat_old.get(key, _ABSENT) != flat_new.get(key, _ABSENT)]


def check_resumable(recipe: Recipe, run_dir: Path) -> None:
    """Refuse to resume `run_dir` (it has rounds) with a recipe whose round sections differ from its config.yaml."""
    saved = run_dir / "config.yaml"
    if not run_dir.is_dir() or not any(run_dir.glob("round-*")):
        return  # nothing finished that a changed recipe could make stale
    try:
        old = yaml.safe_load(saved.read_text(encoding="utf-8")) if saved.is_file() else None
    except (yaml.YAMLError, UnicodeDecodeError):
        old = None
    if not isinstance(old, dict):
        raise AlignpipeError(f"{saved}: missing or unreadable, so the rounds in {run_dir} cannot be matched to this "
                             f"recipe: run under a new name (--set name=NEW) or remove {run_dir} to start over")
    changes = recipe_changes(old, recipe.model_dump(mode="json"))
    if changes:
        shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
        raise AlignpipeError(f"{run_dir}: its rounds were made with a different recipe ({shown}); resuming would "
                             f"redo them over the finished ones: keep the recipe, run under a new name "
                             f"(--set name=NEW), or remove {run_dir} to start over")


def apply_overrides(data: dict, overrides: dict[str, Any] | None) -> dict:
    """`--set` overrides (dotted keys such as synthesis.temperature) written into a recipe's YAML data, in place;
    a key that is empty or runs through a value is an error naming it."""
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        if not all([*parents, leaf]):
            raise AlignpipeError(f"--set {dotted}: an empty key (keys are dotted paths such as synthesis.temperature)")
        for depth, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise AlignpipeError(f"--set {dotted}: {'.'.join(parents[:depth + 1])} is a value, not a section")
        node[leaf] = value
    return data
